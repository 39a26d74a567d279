"""ROUGE-1/2/L of generated summaries (XSum-style JSONL, or any prompt/response examples), greedy or beam
search, with s_FFN measured on the generated tokens (decode steps) and, separately, on the prompts (prefill)."""

from __future__ import annotations

import os
from collections.abc import Sequence

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
    batch_size: int = 16,
) -> dict:
    """Generate a response for each example and score ROUGE against the reference. Greedy decoding runs
    ``batch_size`` prompts at a time, left-padded, each row equal to its batch-1 decode; beam search runs one at
    a time; an answer ends at a special token or a blank line. Returns rouge1/rouge2/rougeL, ``examples``,
    ``generated_tokens``, s_FFN of the decode steps (``s_ffn``) and of the prompts (``prefill_s_ffn``), plus the
    first few predictions. ``chat_template``: wrap each prompt in the tokenizer's chat template (default: when
    the tokenizer has one)."""
    require_causal_lm(model, "rouge")
    check_tokenizer(model, tokenizer)
    if max_new_tokens < 1 or num_beams < 1 or batch_size < 1:
        raise PrunePathError("max_new_tokens, num_beams and batch_size must be >= 1")
    examples = path if isinstance(path, list) else load_examples(path)
    examples = examples[:limit] if limit is not None else examples
    dev = prepare_model(model, device)
    bos = int(tokenizer.bos_token_id) if needs_bos(model, tokenizer) else None
    stops = stop_ids(tokenizer)
    chat = uses_chat_template(tokenizer) if chat_template is None else bool(chat_template)
    if chat and not uses_chat_template(tokenizer):
        raise PrunePathError("chat_template=True but the tokenizer has no chat template; pass chat_template=False")
    decode_meter, prefill_meter = ActiveMeter(model), ActiveMeter(model)
    prompts = [_prompt_ids(tokenizer, ex, max_input_tokens, bos, chat) for ex in examples]
    outs: list[list[int]] = []
    step = batch_size if num_beams == 1 else 1
    for start in tqdm(range(0, len(prompts), step), desc="generating", disable=not progress, leave=False):
        chunk = prompts[start:start + step]
        if num_beams == 1:
            outs += greedy_batch(model, chunk, max_new_tokens, stops, pad=pad_id(tokenizer),
                                 prefill_meter=prefill_meter, decode_meter=decode_meter)
            continue
        ids = torch.tensor(chunk, device=dev)
        with track_active(model, decode_meter, skip_first=True):
            outs.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                       pad_token_id=pad_id(tokenizer), eos_token_id=stops)[0, ids.shape[1]:].tolist())
    gen_tokens = sum(len(o) for o in outs)
    preds = [tokenizer.decode(o, skip_special_tokens=True).strip().split("\n\n")[0].strip() for o in outs]
    refs = [ex.get("summary", ex["response"]).strip() for ex in examples]
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


def stop_ids(tokenizer) -> list[int]:
    """The tokens that end a generated answer: EOS and every other special token. An instruct model that skips
    its end-of-turn token goes straight to the next turn's start token (SmolLM2 sparse at τ 0.8 did, in about
    one summary in ten); that is the end of its answer too."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def greedy_batch(model: nn.Module, prompts: list[list[int]], max_new_tokens: int,
                 stop: int | Sequence[int] | None, *, pad: int = 0, prefill_meter: ActiveMeter | None = None,
                 decode_meter: ActiveMeter | None = None) -> list[list[int]]:
    """Greedy decoding of several prompts at once: left padding, an attention mask and explicit positions, so
    each row's tokens equal its batch-1 decode. A row stops at a token of ``stop`` (one id or several, e.g.
    ``stop_ids(tokenizer)``; not returned) or after ``max_new_tokens``.
    ``prefill_meter`` counts the prompts' tokens, ``decode_meter`` every fed-back generated token (what batch 1
    feeds back: each generated token but a row's last); padding and finished rows are left out of both."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise PrunePathError("greedy_batch needs at least one prompt, none of them empty")
    kw_name, out_name = _cache_names(model)
    dev = next(model.parameters()).device
    stops = None if stop is None else torch.tensor([stop] if isinstance(stop, int) else list(stop), device=dev)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    if prefill_meter is not None:
        prefill_meter.update(model, mask)
    past, nxt, pos = out[out_name], out.logits[:, -1].argmax(-1), pos[:, -1:]
    alive = torch.ones(len(prompts), dtype=torch.bool, device=dev)
    steps, kept = [], []  # tokens of every step and which rows kept them; read back once at the end
    for step in range(max_new_tokens):
        if stops is not None:
            alive = alive & ~torch.isin(nxt, stops)
        steps.append(nxt)
        kept.append(alive)
        if step == max_new_tokens - 1 or not bool(alive.any()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
        pos = pos + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                    **{kw_name: past})
        if decode_meter is not None:
            decode_meter.update(model, alive[:, None])
        past, nxt = out[out_name], out.logits[:, -1].argmax(-1)
    toks, keep = torch.stack(steps, 1).cpu(), torch.stack(kept, 1).cpu()
    result = []
    for row, k in zip(toks.tolist(), keep.tolist()):
        n = k.index(False) if False in k else len(k)  # a row ends at its first stop token
        result.append(row[:n])
    return result
