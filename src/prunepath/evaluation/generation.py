"""ROUGE-1/2/L of generated summaries (XSum-style JSONL, or any prompt/response examples), greedy or beam
search, with s_FFN measured on the generated tokens (decode steps) and, separately, on the prompts (prefill)."""

from __future__ import annotations

import os

import torch
from torch import nn
from tqdm.auto import tqdm

from prunepath.data.instruct import load_examples, xsum_prompt
from prunepath.errors import PrunePathError
from prunepath.evaluation.common import (ActiveMeter, check_tokenizer, model_meta, pad_id, prepare_model,
                                         require_causal_lm, track_active)
from prunepath.models.adapters import needs_bos


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


def uses_chat_template(tokenizer) -> bool:
    """Whether prompts should go through the tokenizer's chat template (instruct models ship one)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _encode(tokenizer, text: str, chat: bool) -> list[int]:
    if not chat:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    if not isinstance(ids, list):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def _prompt_ids(tokenizer, ex: dict, max_input_tokens: int, bos: int | None, chat: bool = False) -> list[int]:
    """Token ids of ``ex``'s prompt, at most ``max_input_tokens``: the article is shortened, not the instruction.
    With ``chat`` the prompt is the user turn of the tokenizer's chat template: an instruct model given the bare
    prompt may answer with end-of-turn at once (SmolLM2-135M-Instruct does on XSum), and the template brings its
    own special tokens, so no BOS is added then."""
    bos = None if chat else bos
    budget = max_input_tokens - (1 if bos is not None else 0)
    ids = _encode(tokenizer, ex["prompt"], chat)
    if len(ids) > budget and "document" in ex:
        overhead = len(_encode(tokenizer, xsum_prompt(""), chat))
        doc = tokenizer(ex["document"], add_special_tokens=False)["input_ids"][: max(budget - overhead - 2, 1)]
        ids = _encode(tokenizer, xsum_prompt(tokenizer.decode(doc)), chat)
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
    chat_template: bool | None = None,
) -> dict:
    """Generate a response for each example (batch 1; stop at EOS or a blank line) and score ROUGE against the
    reference. Returns rouge1/rouge2/rougeL, ``examples``, ``generated_tokens``, s_FFN of the decode steps
    (``s_ffn``) and of the prompts (``prefill_s_ffn``), plus the first few predictions. ``chat_template``: wrap
    each prompt in the tokenizer's chat template (default: when the tokenizer has one)."""
    require_causal_lm(model, "rouge")
    check_tokenizer(model, tokenizer)
    if max_new_tokens < 1 or num_beams < 1:
        raise PrunePathError("max_new_tokens and num_beams must be >= 1")
    examples = path if isinstance(path, list) else load_examples(path)
    examples = examples[:limit] if limit is not None else examples
    dev = prepare_model(model, device)
    bos = int(tokenizer.bos_token_id) if needs_bos(model, tokenizer) else None
    eos = getattr(tokenizer, "eos_token_id", None)
    chat = uses_chat_template(tokenizer) if chat_template is None else bool(chat_template)
    if chat and not uses_chat_template(tokenizer):
        raise PrunePathError("chat_template=True but the tokenizer has no chat template; pass chat_template=False")
    decode_meter, prefill_meter = ActiveMeter(model), ActiveMeter(model)
    preds, refs, gen_tokens = [], [], 0
    for ex in tqdm(examples, desc="generating", disable=not progress, leave=False):
        ids = torch.tensor([_prompt_ids(tokenizer, ex, max_input_tokens, bos, chat)], device=dev)
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
           "chat_template": chat,
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
