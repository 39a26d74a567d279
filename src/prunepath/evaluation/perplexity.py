"""Perplexity on raw text with fixed windows (PAPER.md §5; protocol in docs/evaluation.md).

Protocol: the file is tokenized once (no special tokens). Window k covers the file tokens [k·S, k·S + W) and
scores the ones no earlier window scored (all W for the first window, the last S afterwards; with S = W the
windows do not overlap). The model input is the window's tokens preceded by one context token — BOS when the
model needs it (Gemma), otherwise the file token just before the window — and without the window's last token,
so every position predicts exactly one window token: W positions in, W predictions out. Without BOS the very
first file token has no context and is not scored. Every other token is scored exactly once; the final partial
window is scored too. BOS is never scored. s_FFN is measured on exactly the positions whose predictions are
scored.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunepath.errors import PrunePathError
from prunepath.evaluation.common import (ActiveMeter, check_token_ids, check_tokenizer, model_meta, needs_bos,
                                         pad_id, prepare_model, require_causal_lm, resolve_data_path)

BLOCK_CHARS = 1 << 22  # text is read and tokenized in blocks of about 4 MiB


def _split_point(buf: str) -> int:
    """A cut position in ``buf`` after which tokenization is unaffected: just after a newline that sits between
    two non-space characters (byte-level BPE pre-tokenizers never merge across it). 0 when there is none."""
    i = len(buf) - 1
    while True:
        i = buf.rfind("\n", 0, i)
        if i < 0:
            return 0
        if 0 < i and i + 1 < len(buf) and not buf[i + 1].isspace() and not buf[i - 1].isspace():
            return i + 1


def iter_text_tokens(tokenizer, path: str | os.PathLike, max_tokens: int | None = None,
                     block_chars: int = BLOCK_CHARS, progress: bool = False) -> Iterator[list[int]]:
    """Token ids of a text file, streamed in blocks (cut at safe line boundaries), stopping after ``max_tokens``."""
    path = resolve_data_path(path)
    if path.stat().st_size == 0:
        raise PrunePathError(f"{path} is empty; pass a text file with content")
    produced = 0
    buf = ""
    bar = tqdm(total=path.stat().st_size, desc="tokenizing", unit="B", unit_scale=True, disable=not progress,
               leave=False)
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        while True:
            chunk = fh.read(block_chars)
            bar.update(len(chunk.encode("utf-8", errors="replace")) if chunk else 0)
            buf += chunk
            if chunk and len(buf) < block_chars:
                continue
            cut = len(buf) if not chunk else _split_point(buf)
            if cut == 0:
                if not chunk:
                    break
                continue  # no safe cut yet: read more
            piece, buf = buf[:cut], buf[cut:]
            ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            if max_tokens is not None and produced + len(ids) >= max_tokens:
                yield ids[: max_tokens - produced]
                bar.close()
                return
            produced += len(ids)
            if ids:
                yield ids
            if not chunk and not buf:
                break
    bar.close()


def tokenize_text(tokenizer, data: str | os.PathLike | Iterable[int] | torch.Tensor,
                  max_tokens: int | None = None, progress: bool = False) -> torch.Tensor:
    """Token ids (1-D int64) of a file path or an id list; ``max_tokens`` keeps the first N."""
    if isinstance(data, torch.Tensor):
        ids = data.reshape(-1).long()
    elif isinstance(data, (str, os.PathLike)):
        pieces = [torch.tensor(p, dtype=torch.long) for p in iter_text_tokens(tokenizer, data, max_tokens,
                                                                            progress=progress)]
        ids = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    else:
        ids = torch.tensor(list(data), dtype=torch.long)
    if max_tokens is not None:
        if max_tokens < 2:
            raise PrunePathError(f"max_tokens must be at least 2 (got {max_tokens})")
        ids = ids[:max_tokens]
    return ids


def plan_windows(n_tokens: int, window: int, stride: int, bos: bool) -> list[tuple[int, int, int]]:
    """Windows as (start, end, first_scored) over file-token indices: window k covers [start, end) and scores
    tokens [first_scored, end). Every token (but token 0 without BOS) is scored exactly once."""
    if window < 1:
        raise PrunePathError(f"window must be >= 1 (got {window})")
    if not 1 <= stride <= window:
        raise PrunePathError(f"stride must be between 1 and the window ({window}); got {stride}")
    out = []
    scored_to = 0 if bos else 1
    start = 0
    while scored_to < n_tokens:
        end = min(start + window, n_tokens)
        if end > scored_to:
            out.append((start, end, max(scored_to, start)))
            scored_to = end
        start += stride
    return out


def _window_inputs(ids: torch.Tensor, plan: list[tuple[int, int, int]], bos_id: int | None, pad: int,
                   width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs [B, width] (right-padded), targets [B, width] and the scored mask [B, width] of a batch of windows."""
    b = len(plan)
    inp = torch.full((b, width), pad, dtype=torch.long)
    tgt = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.bool)
    for r, (start, end, first) in enumerate(plan):
        if bos_id is not None:
            ctx = torch.tensor([bos_id])
            lo = start
        elif start > 0:
            ctx = ids[start - 1:start]
            lo = start
        else:  # very first window without BOS: token 0 is context only
            ctx = ids[0:1]
            lo = 1
        x = torch.cat([ctx, ids[lo:end - 1]])
        n = x.numel()
        inp[r, :n] = x
        tgt[r, :n] = ids[lo:end]
        mask[r, first - lo:n] = True
    return inp, tgt, mask


def window_batches(ids: torch.Tensor, plan: list[tuple[int, int, int]], bos_id: int | None, pad: int,
                   batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(inputs, targets, scored mask) for each batch of ``batch_size`` windows of ``plan``."""
    for i in range(0, len(plan), batch_size):
        chunk = plan[i:i + batch_size]
        # Input length of a window = end - (first input file token); see _window_inputs.
        width = max(e - (1 if s == 0 and bos_id is None else s) for s, e, _ in chunk)
        yield _window_inputs(ids, chunk, bos_id, pad, width)


@torch.inference_mode()
def score_tokens(model: nn.Module, ids: torch.Tensor, *, window: int, stride: int, bos_id: int | None,
                 pad: int, batch_size: int = 4, progress: bool = True, meter: ActiveMeter | None = None,
                 desc: str = "perplexity") -> tuple[float, int]:
    """Sum of NLL (nats, float64) and number of scored tokens under the window protocol."""
    if batch_size < 1:
        raise PrunePathError(f"batch_size must be >= 1 (got {batch_size})")
    plan = plan_windows(int(ids.numel()), window, stride, bos_id is not None)
    dev = next(model.parameters()).device
    nll = 0.0
    count = 0
    bar = tqdm(total=sum(e - f for _, e, f in plan), desc=desc, unit="tok", disable=not progress, leave=False)
    for inp, tgt, mask in window_batches(ids, plan, bos_id, pad, batch_size):
        inp, tgt, mask = inp.to(dev), tgt.to(dev), mask.to(dev)
        # Right padding needs no attention mask in a causal model: real positions never see later ones.
        logits = model(input_ids=inp, use_cache=False).logits
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        # Unscored positions are ignored in place (no copy of the vocab-sized logits).
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.masked_fill(~mask, -100).reshape(-1),
                               reduction="sum", ignore_index=-100)
        nll += float(loss.double())
        n = int(mask.sum())
        count += n
        if meter is not None:
            meter.update(model, mask)
        bar.update(n)
    bar.close()
    return nll, count


def evaluate_perplexity(
    model: nn.Module,
    tokenizer,
    data: str | Path | list[int],
    *,
    window: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity of a causal LM on a text file (or pre-tokenized ids) under the window protocol above.

    Returns ``ppl`` (= exp of the mean NLL), ``nll`` (mean, nats), ``tokens`` (scored), ``s_ffn``,
    ``mean_active``, ``per_layer_active``, per-layer histograms, ``window``, ``stride``, ``bos``, ``model``.
    A dense, unconverted model reports s_ffn 0.
    """
    require_causal_lm(model, "ppl")
    stride = window if stride is None else stride
    prepare_model(model, device)
    if isinstance(data, (str, os.PathLike)):
        check_tokenizer(model, tokenizer)
    bos = needs_bos(model, tokenizer) if tokenizer is not None else False
    ids = tokenize_text(tokenizer, data, max_tokens, progress=progress)
    if ids.numel() < (1 if bos else 2):
        raise PrunePathError("not enough text to score: need at least 2 tokens; pass a larger file or max_tokens")
    check_token_ids(model, ids)
    meter = ActiveMeter(model)
    nll, count = score_tokens(model, ids, window=window, stride=stride,
                              bos_id=int(tokenizer.bos_token_id) if bos else None,
                              pad=pad_id(tokenizer) if tokenizer is not None else 0, batch_size=batch_size,
                              progress=progress, meter=meter)
    mean = nll / count
    out = {"task": "ppl", **model_meta(model), "ppl": math.exp(mean), "nll": mean, "nll_sum": nll,
           "tokens": count, "input_tokens": int(ids.numel()), "window": window, "stride": stride, "bos": bos,
           "max_tokens": max_tokens}
    if isinstance(data, (str, os.PathLike)):
        out["data"] = str(data)
    out.update(meter.result())
    return out
