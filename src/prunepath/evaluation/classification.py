"""GLUE-style classification: accuracy (plus F1 for MRPC, Matthews correlation for CoLA), with s_FFN on the
non-padding tokens of the inputs.

A model with a classification head (``...ForSequenceClassification``) predicts the argmax of its logits. A
causal LM without one is evaluated zero-shot: each label's verbaliser is scored as a continuation of a prompt
(the lm-evaluation-harness GLUE prompts) and the most likely label wins.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from prunepath.data.glue import GlueData, load_glue
from prunepath.errors import PrunePathError
from prunepath.evaluation.common import ActiveMeter, check_tokenizer, model_meta, prepare_model
from prunepath.evaluation.lm import encode_pair, loglikelihoods

# Zero-shot prompts and label verbalisers (label index order) for causal LMs.
PROMPTS = {
    "sst2": ("{a}\nQuestion: Is this sentence positive or negative?\nAnswer:", (" negative", " positive")),
    "mrpc": ("Sentence 1: {a}\nSentence 2: {b}\nQuestion: Do both sentences mean the same thing?\nAnswer:",
             (" no", " yes")),
    "rte": ("{a}\nQuestion: {b} True or False?\nAnswer:", (" True", " False")),
    "cola": ("{a}\nQuestion: Does this sentence make sense?\nAnswer:", (" no", " yes")),
}


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    p, y = np.asarray(preds), np.asarray(labels)
    return float((p == y).mean())


def binary_f1(preds: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class (GLUE's MRPC F1); 0 when there are no true or predicted positives."""
    p, y = np.asarray(preds) == positive, np.asarray(labels) == positive
    tp = int((p & y).sum())
    denom = int(p.sum()) + int(y.sum())
    return 2.0 * tp / denom if denom else 0.0


def matthews_corr(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation (multi-class R_K form; equals the binary MCC); 0 when undefined."""
    p, y = np.asarray(preds), np.asarray(labels)
    classes = np.union1d(p, y)
    c = np.array([[np.sum((y == a) & (p == b)) for b in classes] for a in classes], dtype=np.float64)
    t, pk, n = c.sum(1), c.sum(0), c.sum()
    cov_yp = np.trace(c) * n - t @ pk
    cov_yy = n * n - t @ t
    cov_pp = n * n - pk @ pk
    denom = math.sqrt(cov_yy * cov_pp)
    return float(cov_yp / denom) if denom else 0.0


def classification_metrics(preds: Sequence[int], labels: Sequence[int], task: str) -> dict:
    out = {"accuracy": accuracy(preds, labels)}
    if task == "mrpc":
        out["f1"] = binary_f1(preds, labels)
    if task == "cola":
        out["mcc"] = matthews_corr(preds, labels)
    return out


def _is_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification") or hasattr(model, "classifier") or \
        hasattr(model, "score")


@torch.inference_mode()
def _predict_head(model, tokenizer, data: GlueData, batch_size, max_length, meter, progress) -> list[int]:
    n_out = int(getattr(model.config, "num_labels", 0) or 0)
    if n_out != data.num_labels:
        raise PrunePathError(f"the model's classification head has {n_out} labels but {data.task} has "
                             f"{data.num_labels}; use a model trained for {data.task}")
    if getattr(model.config, "pad_token_id", None) is None and getattr(tokenizer, "pad_token_id", None) is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers locate the last real token
    a = [t[0] for t in data.texts]
    b = [t[1] for t in data.texts]
    pair = any(x is not None for x in b)
    lengths = [len(x) + len(y or "") for x, y in data.texts]
    order = sorted(range(len(a)), key=lambda i: -lengths[i])  # similar lengths per batch: less padding
    preds = [0] * len(a)
    dev = next(model.parameters()).device
    for s in tqdm(range(0, len(order), batch_size), desc=f"{data.task}", disable=not progress, leave=False):
        idx = order[s:s + batch_size]
        enc = tokenizer([a[i] for i in idx], [b[i] or "" for i in idx] if pair else None, truncation=True,
                        max_length=max_length, padding=True, return_tensors="pt")
        enc = {k: v.to(dev) for k, v in enc.items()}
        logits = model(**enc).logits
        if meter is not None:
            meter.update(model, enc["attention_mask"].bool())
        for i, p in zip(idx, logits.argmax(-1).tolist()):
            preds[i] = int(p)
    return preds


def _predict_zero_shot(model, tokenizer, data: GlueData, batch_size, max_length, meter, progress) -> list[int]:
    template, verbalisers = PROMPTS[data.task]
    pairs = []
    for x, y in data.texts:
        ctx = template.format(a=x, b=y or "")
        pairs.extend(encode_pair(tokenizer, ctx, v) for v in verbalisers)
    scores = loglikelihoods(model, tokenizer, pairs, batch_size=batch_size, max_length=max_length, meter=meter,
                            progress=progress, desc=f"{data.task} (zero-shot)")
    k = len(verbalisers)
    return [int(np.argmax([scores[i * k + j][0] for j in range(k)])) for i in range(len(data))]


def evaluate_classification(
    model: nn.Module,
    tokenizer,
    path_or_data: str | os.PathLike | GlueData,
    task: str | None = None,
    *,
    batch_size: int = 16,
    max_length: int = 256,
    limit: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Accuracy (+ ``f1`` for MRPC, ``mcc`` for CoLA), ``examples``, ``mode`` (head / zero-shot), s_FFN stats."""
    data = path_or_data if isinstance(path_or_data, GlueData) else load_glue(path_or_data, task)
    if task is not None and task != data.task:
        raise PrunePathError(f"the data is {data.task} but task={task!r} was asked for")
    data = data.head(limit)
    check_tokenizer(model, tokenizer)
    prepare_model(model, device)
    meter = ActiveMeter(model)
    if _is_classifier(model):
        mode = "head"
        preds = _predict_head(model, tokenizer, data, batch_size, max_length, meter, progress)
    elif hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        mode = "zero-shot"
        preds = _predict_zero_shot(model, tokenizer, data, batch_size, max_length, meter, progress)
    else:
        raise PrunePathError(f"{type(model).__name__} has neither a classification head nor an LM head; train a "
                             f"classifier first (prunepath train --task {data.task}) or load it with "
                             "task='classify'")
    out = {"task": data.task, **model_meta(model), **classification_metrics(preds, data.labels, data.task),
           "examples": len(data), "mode": mode, "data": data.path}
    res = meter.result()
    res["tokens"] = res.pop("stat_tokens")
    out.update(res)
    out["predictions"] = preds
    return out
