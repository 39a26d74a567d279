"""lm-evaluation-harness adapter: evaluate a PrunePath checkpoint (or any causal LM) at a given τ with
``lm_eval`` tasks (MMLU 5-shot, HellaSwag, ...), implementing its LM interface (loglikelihood,
loglikelihood_rolling, generate_until). s_FFN is accumulated over every token the harness feeds the model.

Python::

    from prunepath.evaluation.lm_eval_adapter import PrunePathLM, run_lm_eval
    lm = PrunePathLM(pretrained="ckpt/", tau=0.8)           # or PrunePathLM(model=m, tokenizer=tok)
    import lm_eval; lm_eval.simple_evaluate(model=lm, tasks=["mmlu"], num_fewshot=5)

CLI: ``prunepath eval --model ckpt/ --tau 0.8 --task lm-eval --lm-eval-tasks mmlu --num-fewshot 5``, or the
harness's own CLI with this module registered: ``python -m prunepath.evaluation.lm_eval_adapter run --model
prunepath --model_args pretrained=ckpt/,tau=0.8 --tasks hellaswag --device cpu``.
The module imports without lm_eval installed (the class then derives from ``object``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunepath.errors import PrunePathError
from prunepath.evaluation.common import ActiveMeter, check_tokenizer, model_meta, pad_id, prepare_model, \
    track_active
from prunepath.evaluation.lm import encode_pair, loglikelihoods
from prunepath.evaluation.lm import prefix_token
from prunepath.evaluation.perplexity import score_tokens
from prunepath.models.arch import max_positions
from prunepath.models.loading import load_model
from prunepath.routing.control import configure

try:  # the harness is optional
    from lm_eval.api.model import LM as _LMBase
    HAVE_LM_EVAL = True
except ImportError:  # pragma: no cover - exercised when lm_eval is absent
    _LMBase = object
    HAVE_LM_EVAL = False


class PrunePathLM(_LMBase):  # type: ignore[misc, valid-type]
    """An lm-evaluation-harness LM backed by a Hugging Face causal LM, optionally at routing budget ``tau``."""

    def __init__(self, pretrained: str | None = None, *, model: nn.Module | None = None, tokenizer: Any = None,
                 tau: float | str | None = None, device: str | None = None, batch_size: int | str = 8,
                 max_length: int | str | None = None, max_gen_toks: int | str = 256, **_ignored) -> None:
        if HAVE_LM_EVAL:
            super().__init__()

        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # The harness's CLI passes device="cuda" unless told otherwise.
            import warnings
            warnings.warn(f"device {device} is not available here; evaluating on the CPU", stacklevel=2)
            device = "cpu"
        if model is None:
            if pretrained is None:
                raise PrunePathError("PrunePathLM needs pretrained=NAME|DIR or model=")
            model, tok = load_model(pretrained, device=device)
            tokenizer = tokenizer or tok
        check_tokenizer(model, tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self._dev = prepare_model(model, device)
        if tau is not None:
            configure(model, tau=float(tau))
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" → 8
        limit = max_positions(model.config) or 2048
        self.max_length = int(max_length) if max_length is not None else min(int(limit), 2048)
        self.max_gen_toks = int(max_gen_toks)
        self.meter = ActiveMeter(model)

    # ---- lm-eval interface ---------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int | None:
        return getattr(self.tokenizer, "eos_token_id", None)

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:

        pairs = [encode_pair(self.tokenizer, *_args(r)[:2]) for r in requests]
        return loglikelihoods(self.model, self.tokenizer, pairs, batch_size=self.batch_size,
                              max_length=self.max_length, meter=self.meter, progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string: a prefix token (BOS if needed, else EOS) then non-overlapping
        windows of ``max_length`` as in `prunepath eval --task ppl`; every token scored exactly once."""

        bos = prefix_token(self.model, self.tokenizer)
        prefix = bos if bos is not None else self.eot_token_id
        out = []
        for r in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm, leave=False):
            ids = self.tok_encode(_args(r)[0])
            if not ids:
                out.append(0.0)
                continue
            seq = torch.tensor(([prefix] if prefix is not None else []) + ids, dtype=torch.long)
            nll, _ = score_tokens(self.model, seq, window=self.max_length, stride=self.max_length, bos_id=None,
                                  pad=pad_id(self.tokenizer), batch_size=self.batch_size, progress=False,
                                  meter=self.meter)
            out.append(-nll)
        return out

    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation (batch 1) until any of ``until`` appears or ``max_gen_toks`` tokens."""

        bos = prefix_token(self.model, self.tokenizer)
        results = []
        for r in tqdm(requests, desc="generate_until", disable=disable_tqdm, leave=False):
            context, kwargs = _args(r)[:2]
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks)))
            ids = ([bos] if bos is not None else []) + self.tok_encode(context)
            ids = ids[-(self.max_length - max_new):] if self.max_length > max_new else ids[-1:]
            x = torch.tensor([ids], device=self._dev)
            with track_active(self.model, self.meter):
                gen = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                                          do_sample=False, pad_token_id=pad_id(self.tokenizer),
                                          eos_token_id=self.eot_token_id)[0, x.shape[1]:]
            text = self.tokenizer.decode(gen, skip_special_tokens=False)
            cut = min([text.find(u) for u in until if u and u in text] or [len(text)])
            results.append(text[:cut])
        return results

    def sparsity(self) -> dict:
        """s_FFN statistics over every token evaluated so far."""
        return self.meter.result()


def _args(request) -> tuple:
    return tuple(request.args) if hasattr(request, "args") else tuple(request)


def run_lm_eval(model: nn.Module, tokenizer, tasks: list[str], *, num_fewshot: int | None = None,
                limit: int | float | None = None, include_path: str | None = None, batch_size: int = 8,
                include_defaults: bool = True, **_ignored) -> dict:
    """Run lm-evaluation-harness ``tasks`` on ``model`` at its current routing; returns the harness's metrics
    per task (``results``), flattened metrics of the first task, and s_FFN over all evaluated tokens.
    ``include_path`` adds a folder of task YAMLs; ``include_defaults=False`` skips indexing the built-in tasks."""
    if not HAVE_LM_EVAL:
        raise PrunePathError("lm-evaluation-harness is not installed: pip install lm-eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = PrunePathLM(model=model, tokenizer=tokenizer, batch_size=batch_size)
    tm = TaskManager(include_path=include_path, include_defaults=include_defaults or not include_path)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=tm, log_samples=False, bootstrap_iters=0)
    results = {t: {k: v for k, v in m.items() if isinstance(v, (int, float, str)) or v is None}
               for t, m in (res or {}).get("results", {}).items()}
    out = {"task": "lm-eval", **model_meta(model), "lm_eval_tasks": list(tasks), "num_fewshot": num_fewshot,
           "results": results}
    first = results.get(tasks[0], {})
    for k, v in first.items():  # e.g. "acc,none" → acc
        if isinstance(v, float):
            out.setdefault(k.split(",")[0], v)
    res_s = lm.sparsity()
    res_s["tokens"] = res_s.pop("stat_tokens")
    out.update(res_s)
    return out


if HAVE_LM_EVAL:  # make `--model prunepath` available to the harness once this module is imported
    try:
        from lm_eval.api.registry import register_model
        register_model("prunepath")(PrunePathLM)
    except Exception:  # pragma: no cover - already registered or registry API changed
        pass


if __name__ == "__main__":  # pragma: no cover - thin wrapper around the harness CLI
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()
