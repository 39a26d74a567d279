"""One entry point per task name, and per-task data preparation that sweeps reuse across τ."""

from __future__ import annotations

from typing import Any

from torch import nn

from prunepath.errors import PrunePathError
from prunepath.data.glue import GlueData, load_glue
from prunepath.data.instruct import load_examples
from prunepath.evaluation.classification import evaluate_classification
from prunepath.evaluation.common import model_meta
from prunepath.evaluation.generation import evaluate_rouge
from prunepath.evaluation.lm_eval_adapter import run_lm_eval
from prunepath.evaluation.perplexity import evaluate_perplexity
from prunepath.evaluation.perplexity import tokenize_text
from prunepath.evaluation.reconstruction import topk_reconstruction

GLUE_TASKS = ("sst2", "mrpc", "rte", "cola")
METRICS = {"ppl": "ppl", "classify": "accuracy", "sst2": "accuracy", "mrpc": "accuracy", "rte": "accuracy",
           "cola": "accuracy", "rouge": "rougeL", "recon": "mse"}


def prepare_data(tokenizer, task: str, data: Any, **kw) -> Any:
    """Load / tokenize ``data`` once (a sweep evaluates it at many τ)."""
    if task == "ppl":
        return tokenize_text(tokenizer, data, kw.get("max_tokens"), progress=kw.get("progress", False))
    if task == "recon":
        return tokenize_text(tokenizer, data, kw.get("max_tokens", 2048))
    if task in ("classify", *GLUE_TASKS):
        return data if isinstance(data, GlueData) else load_glue(data, None if task == "classify" else task)
    if task == "rouge":
        return data if isinstance(data, list) else load_examples(data)
    return data


def run_task(model: nn.Module, tokenizer, task: str, data: Any, **kw) -> dict:
    """Evaluate ``task`` on ``data`` and return the result dict (metric, tokens/examples, s_FFN statistics)."""
    import os

    if task == "ppl":
        out = evaluate_perplexity(model, tokenizer, data, **kw)
    elif task in ("classify", *GLUE_TASKS):
        out = evaluate_classification(model, tokenizer, data, None if task == "classify" else task, **kw)
    elif task == "rouge":
        out = evaluate_rouge(model, tokenizer, data, **kw)
    elif task == "recon":
        rows = topk_reconstruction(model, tokenizer, data, **kw)
        out = {"task": "recon", **model_meta(model), "rows": rows}
    elif task == "lm-eval":
        out = run_lm_eval(model, tokenizer, **kw)
    else:
        raise PrunePathError(f"unknown task {task!r}; choose one of ppl, classify, {', '.join(GLUE_TASKS)}, "
                             "rouge, recon, lm-eval")
    if isinstance(data, (str, os.PathLike)):
        out.setdefault("data", str(data))
    return out
