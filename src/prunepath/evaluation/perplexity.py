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
from prunepath.evaluation.common import (ActiveMeter, check_text_file, check_token_ids, check_tokenizer, model_meta,
                                         pad_id, prepare_model, require_causal_lm, resolve_data_path)
from prunepath.models.adapters import needs_bos

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
    check_text_file(path)
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


HEAD_CHUNK_BYTES = 1 << 29  # fp32 logits per LM-head GEMM block (512 MiB; 2,730 rows at a 49k vocabulary)
SOFTMAX_CHUNK_BYTES = 1 << 23  # fp32 logits per log-softmax call on CPU (8 MiB): stays in cache


def split_lm_head(model: nn.Module, probe: torch.Tensor | None = None) -> tuple[nn.Module, nn.Module] | None:
    """``(decoder, lm_head)`` when the model's logits are exactly ``lm_head(decoder(ids).last_hidden_state)``.

    Checked structurally (``get_decoder`` / ``get_output_embeddings``) and, when ``probe`` ids [1, n] are given,
    numerically on one short forward (this catches logit soft-capping or scaling that some architectures add in
    their forward). None means: use the model's own logits. The probe forward runs before any scored forward,
    so it never disturbs the per-forward routing statistics that s_FFN is read from.
    """
    get_dec = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if get_dec is None or get_head is None:
        return None
    try:
        decoder, head = get_dec(), get_head()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    if decoder is None or head is None or decoder is model or not isinstance(head, nn.Module):
        return None
    if probe is not None:
        try:
            ref = model(input_ids=probe, use_cache=False).logits
            got = head(decoder(input_ids=probe, use_cache=False).last_hidden_state)
        except (AttributeError, TypeError, ValueError, RuntimeError):
            return None
        if ref.shape != got.shape or not torch.allclose(got.float(), ref.float(), rtol=1e-3, atol=1e-3):
            return None
    return decoder, head


def head_nll_sum(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module,
                 chunk_bytes: int = HEAD_CHUNK_BYTES, softmax_bytes: int = SOFTMAX_CHUNK_BYTES) -> torch.Tensor:
    """Sum over rows of -log softmax(head(hidden))[target] as a float64 scalar tensor (on the hidden's device).

    ``hidden`` [N, d] holds only the scored positions, so the LM head runs on nothing else (no padding, no
    overlap context). The head's GEMM runs on blocks of rows whose float32 logits take at most ``chunk_bytes``;
    on CPU the log-softmax then runs on sub-blocks of at most ``softmax_bytes`` (cache-resident, instead of one
    memory-bound pass over the whole batch's logits). The log-softmax is float32 for bf16/fp16 logits (float64
    for a float64 model), so the result does not depend on the chunking beyond summation order.
    """
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    n = hidden.shape[0]
    if n == 0:
        return total
    weight = getattr(head, "weight", None)
    vocab = int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None
    rows = n if vocab is None else max(256, chunk_bytes // (4 * vocab))
    sub = rows if vocab is None or hidden.device.type != "cpu" else max(1, softmax_bytes // (4 * vocab))
    for i in range(0, n, rows):
        logits = head(hidden[i:i + rows])
        for j in range(0, logits.shape[0], sub):
            part = logits[j:j + sub]
            if part.dtype in (torch.float16, torch.bfloat16):
                part = part.float()
            total += F.cross_entropy(part, targets[i + j:i + j + part.shape[0]], reduction="sum").double()
    return total


@torch.inference_mode()
def score_tokens(model: nn.Module, ids: torch.Tensor, *, window: int, stride: int, bos_id: int | None,
                 pad: int, batch_size: int = 4, progress: bool = True, meter: ActiveMeter | None = None,
                 desc: str = "perplexity", fused_head: bool = True) -> tuple[float, int]:
    """Sum of NLL (nats, float64) and number of scored tokens under the window protocol.

    With ``fused_head`` (default) the LM head and the loss run only on scored positions, chunked (see
    :func:`head_nll_sum`), whenever :func:`split_lm_head` confirms the model allows it; otherwise (or with
    ``fused_head=False``) the model's full logits are used. Both give the same NLL up to float rounding.
    """
    if batch_size < 1:
        raise PrunePathError(f"batch_size must be >= 1 (got {batch_size})")
    plan = plan_windows(int(ids.numel()), window, stride, bos_id is not None)
    dev = next(model.parameters()).device
    split = None
    if fused_head and plan:
        probe = ids[: min(8, int(ids.numel()))].view(1, -1).to(dev)
        split = split_lm_head(model, probe)
    nll = torch.zeros((), dtype=torch.float64, device=dev)
    count = 0
    bar = tqdm(total=sum(e - f for _, e, f in plan), desc=desc, unit="tok", disable=not progress, leave=False)
    for inp, tgt, mask in window_batches(ids, plan, bos_id, pad, batch_size):
        n = int(mask.sum())
        inp, tgt, mask = inp.to(dev), tgt.to(dev), mask.to(dev)
        # Right padding needs no attention mask in a causal model: real positions never see later ones.
        if split is not None:
            decoder, head = split
            hidden = decoder(input_ids=inp, use_cache=False).last_hidden_state
            nll += head_nll_sum(hidden[mask], tgt[mask], head)
        else:
            logits = model(input_ids=inp, use_cache=False).logits
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            # Unscored positions are ignored in place (no copy of the vocab-sized logits).
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.masked_fill(~mask, -100).reshape(-1),
                                   reduction="sum", ignore_index=-100).double()
        count += n
        if meter is not None:
            meter.update(model, mask)
        bar.update(n)
    bar.close()
    return float(nll), count


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
    fused_head: bool = True,
) -> dict:
    """Perplexity of a causal LM on a text file (or pre-tokenized ids) under the window protocol above.

    Returns ``ppl`` (= exp of the mean NLL), ``nll`` (mean, nats), ``tokens`` (scored), ``s_ffn``,
    ``mean_active``, ``per_layer_active``, per-layer histograms, ``window``, ``stride``, ``bos``, ``model``,
    ``dtype`` (the model's weights). A dense, unconverted model reports s_ffn 0. ``fused_head=False`` scores
    from the model's full logits instead of the LM head on scored positions only (same result; slower).
    Speed: the model's dtype decides it (bfloat16 is ~1.8x faster on CPUs with avx512_bf16; see
    docs/evaluation.md, "Speed").
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
                              progress=progress, meter=meter, fused_head=fused_head)
    mean = nll / count
    out = {"task": "ppl", **model_meta(model), "ppl": math.exp(mean), "nll": mean, "nll_sum": nll,
           "tokens": count, "input_tokens": int(ids.numel()), "window": window, "stride": stride, "bos": bos,
           "max_tokens": max_tokens}
    if isinstance(data, (str, os.PathLike)):
        out["data"] = str(data)
    out.update(meter.result())
    return out
