"""ROUGE-1/2/L of generated summaries (XSum-style JSONL, or any prompt/response examples), greedy or beam
search, with s_FFN measured on the generated tokens (decode steps) and, separately, on the prompts (prefill)."""

from __future__ import annotations

import os

import torch
from torch import nn
from tqdm.auto import tqdm

from prunepath.data.instruct import load_examples, xsum_prompt
from prunepath.errors import PrunePathError
from prunepath.evaluation.common import (ActiveMeter, check_tokenizer, model_meta, needs_bos, pad_id,
                                         prepare_model, require_causal_lm, track_active)


def rouge_scores(predictions: list[str], references: list[str]) -> dict:
    """Mean F-measures of ROUGE-1/2/L (Google's rouge-score, Porter stemming), as fractions in [0, 1]."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:  # pragma: no cover - an optional extra
        raise PrunePathError("ROUGE needs the rouge-score package: pip install 'prunepath[eval]'") from exc
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(predictions, references):
        s = scorer.score(r, p)
        for k in totals:
            totals[k] += s[k].fmeasure
    n = max(len(predictions), 1)
    return {k: v / n for k, v in totals.items()}


def _prompt_ids(tokenizer, ex: dict, max_input_tokens: int, bos: int | None) -> list[int]:
    budget = max_input_tokens - (1 if bos is not None else 0)
    ids = tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"]
    if len(ids) > budget and "document" in ex:
        # Shorten the article, not the instruction around it.
        overhead = len(tokenizer(xsum_prompt(""), add_special_tokens=False)["input_ids"])
        doc = tokenizer(ex["document"], add_special_tokens=False)["input_ids"][: max(budget - overhead - 2, 1)]
        ids = tokenizer(xsum_prompt(tokenizer.decode(doc)), add_special_tokens=False)["input_ids"]
    ids = ids[-budget:]
    return ([bos] if bos is not None else []) + ids


@torch.inference_mode()
def evaluate_rouge(
    model: nn.Module,
    tokenizer,
    path: str | os.PathLike | list[dict],
    max_new_tokens: int = 64,
    num_beams: int = 1,
    limit: int | None = None,
    *,
    max_input_tokens: int = 1024,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Generate a response for each example (batch 1; stop at EOS or a blank line) and score ROUGE against the
    reference. Returns rouge1/rouge2/rougeL, ``examples``, ``generated_tokens``, s_FFN of the decode steps
    (``s_ffn``) and of the prompts (``prefill_s_ffn``), plus the first few predictions."""
    require_causal_lm(model, "rouge")
    check_tokenizer(model, tokenizer)
    if max_new_tokens < 1 or num_beams < 1:
        raise PrunePathError("max_new_tokens and num_beams must be >= 1")
    examples = path if isinstance(path, list) else load_examples(path)
    examples = examples[:limit] if limit is not None else examples
    dev = prepare_model(model, device)
    bos = int(tokenizer.bos_token_id) if needs_bos(model, tokenizer) else None
    eos = getattr(tokenizer, "eos_token_id", None)
    decode_meter, prefill_meter = ActiveMeter(model), ActiveMeter(model)
    preds, refs, gen_tokens = [], [], 0
    for ex in tqdm(examples, desc="generating", disable=not progress, leave=False):
        ids = torch.tensor([_prompt_ids(tokenizer, ex, max_input_tokens, bos)], device=dev)
        with track_active(model, decode_meter, skip_first=True):
            if num_beams == 1:
                # Prefill statistics come from the first forward (the whole prompt).
                out = _greedy(model, ids, max_new_tokens, eos, prefill_meter)
            else:
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     num_beams=num_beams, do_sample=False, pad_token_id=pad_id(tokenizer),
                                     eos_token_id=eos)[0, ids.shape[1]:].tolist()
        gen_tokens += len(out)
        text = tokenizer.decode(out, skip_special_tokens=True)
        text = text.strip().split("\n\n")[0].strip()
        preds.append(text)
        refs.append(ex.get("summary", ex["response"]).strip())
    out = {"task": "rouge", **model_meta(model), **rouge_scores(preds, refs), "examples": len(preds),
           "generated_tokens": gen_tokens, "max_new_tokens": max_new_tokens, "num_beams": num_beams,
           "samples": [{"prediction": p, "reference": r} for p, r in zip(preds[:5], refs[:5])]}
    res = decode_meter.result()
    res["tokens"] = res.pop("stat_tokens")
    out.update(res)
    pre = prefill_meter.result()
    out["prefill_s_ffn"] = pre["s_ffn"]
    return out


def _cache_names(model: nn.Module) -> tuple[str, str]:
    """(forward keyword, output field) of the KV cache: ``cache`` in transformers 5, ``past_key_values`` before."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return name, name


def _greedy(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, eos: int | None,
            prefill_meter: ActiveMeter) -> list[int]:
    """Greedy decoding with the KV cache (one forward per new token)."""
    kw_name, out_name = _cache_names(model)
    out = model(input_ids=ids, use_cache=True)
    prefill_meter.update(model)
    past = out[out_name]
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    result = []
    for _ in range(max_new_tokens):
        tok = int(nxt)
        if eos is not None and tok == eos:
            break
        result.append(tok)
        if len(result) == max_new_tokens:
            break
        out = model(input_ids=nxt, use_cache=True, **{kw_name: past})
        past = out[out_name]
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return result
