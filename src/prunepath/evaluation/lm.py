"""Batched log-likelihood of continuations under a causal LM (used by zero-shot classification and the
lm-evaluation-harness adapter). Vectorised: one forward per batch, no per-token Python work."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunepath.evaluation.common import ActiveMeter, pad_id
from prunepath.models.adapters import needs_bos


def prefix_token(model: nn.Module, tokenizer) -> int | None:
    """Token that starts every sequence: BOS when the model needs it, else None."""
    return int(tokenizer.bos_token_id) if needs_bos(model, tokenizer) else None


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context / continuation ids as lm-evaluation-harness does: trailing spaces of the context move to the
    continuation, and the continuation is what the joint encoding adds after the context's encoding."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    if whole[:len(ctx)] != ctx:  # the joint encoding merged across the boundary: encode separately
        return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def loglikelihoods(model: nn.Module, tokenizer, pairs: list[tuple[list[int], list[int]]], *,
                   batch_size: int = 8, max_length: int = 2048, meter: ActiveMeter | None = None,
                   progress: bool = True, desc: str = "loglikelihood") -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), continuation is the greedy choice) per (context ids, continuation
    ids) pair. A prefix token (BOS if the model needs one, else EOS) is prepended when the context is empty or the
    model needs BOS. Inputs longer than ``max_length`` lose tokens from the left."""
    bos = prefix_token(model, tokenizer)
    fallback = bos if bos is not None else getattr(tokenizer, "eos_token_id", None)
    seqs = []
    for ctx, cont in pairs:
        if not cont:
            raise ValueError("empty continuation")
        if bos is not None:
            ctx = [bos, *ctx]
        elif not ctx:
            ctx = [fallback if fallback is not None else 0]
        full = (ctx + cont)[-(max_length + 1):]
        seqs.append((full[:-1], full[-len(cont):] if len(cont) < len(full) else full[1:]))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out: list[tuple[float, bool] | None] = [None] * len(seqs)
    dev = next(model.parameters()).device
    pad = pad_id(tokenizer)
    for b in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[b:b + batch_size]
        width = max(len(seqs[i][0]) for i in idx)
        inp = torch.full((len(idx), width), pad, dtype=torch.long)
        real = torch.zeros((len(idx), width), dtype=torch.bool)
        for r, i in enumerate(idx):
            x = seqs[i][0]
            inp[r, :len(x)] = torch.tensor(x)
            real[r, :len(x)] = True
        logits = model(input_ids=inp.to(dev), use_cache=False).logits
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if meter is not None:
            meter.update(model, real.to(dev))
        for r, i in enumerate(idx):
            x, cont = seqs[i]
            n = len(cont)
            lp = F.log_softmax(logits[r, len(x) - n:len(x)], dim=-1)
            tgt = torch.tensor(cont, device=lp.device)
            out[i] = (float(lp.gather(-1, tgt[:, None]).sum().double()), bool((lp.argmax(-1) == tgt).all()))
    return out  # type: ignore[return-value]
