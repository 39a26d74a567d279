"""TEAL / CATS calibration: one pass over calibration text keeps, per layer, sorted samples of |x|, |h| and |gate|
and a subset of FFN inputs (:class:`ActivationStats`), enough to set thresholds for any target afterwards
(:mod:`prunepath.baselines.activation`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunepath.errors import PrunePathError
from prunepath.models.adapters import DenseFFN, adapter_for, needs_bos
from prunepath.state import state_of
from prunepath.stats import activation_modules as stats_activation_modules
from prunepath.baselines.calibration import token_batches


@dataclass
class ActivationStats:
    """What one calibration pass keeps (enough to set thresholds for any target).

    Per layer: sorted random samples of |x|, |h| and (gated) |act(gate)| over the calibration tokens, and a random
    subset of the FFN inputs (rows of x) for the greedy allocation's error measurement. ``ffns`` holds references
    to the FFN weights (no copies).
    """

    x_abs: list[torch.Tensor]
    h_abs: list[torch.Tensor]
    gate_abs: list[torch.Tensor] | None
    inputs: list[torch.Tensor]
    ffns: list[DenseFFN]
    gated: bool
    adapter: str
    tokens: int
    source: str = ""

    @property
    def num_layers(self) -> int:
        return len(self.x_abs)


def calibration_batches(model: nn.Module, tokenizer, texts: Sequence[str], *, max_tokens: int, seq_len: int,
                        batch_size: int = 4) -> list[torch.Tensor]:
    """[batch, seq_len] id tensors from ``texts`` (EOS between documents), BOS first in each row when the model
    needs it (as evaluation windows have)."""

    if not texts or not any(isinstance(t, str) and t.strip() for t in texts):
        raise PrunePathError("the calibration text is missing or empty; pass documents (e.g. --calib-data "
                             "mix:sotu,moby-dick,austen,brown), never the evaluation text")
    if seq_len < 2:
        raise PrunePathError(f"seq_len must be at least 2 (got {seq_len})")
    if max_tokens < seq_len:
        raise PrunePathError(f"max_tokens ({max_tokens}) is shorter than one window (seq_len {seq_len}); raise "
                             "--calib-tokens or lower seq_len")
    bos = needs_bos(model, tokenizer)
    step = seq_len - 1 if bos else seq_len
    rows = max_tokens // seq_len
    batches = token_batches(tokenizer, texts, seq_len=step, max_tokens=rows * step, batch_size=batch_size)
    if bos:
        batches = [torch.cat([torch.full((b.shape[0], 1), int(tokenizer.bos_token_id)), b], 1) for b in batches]
    return batches


def _sample(values: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` random entries (with replacement) of a flattened tensor, float32 on the CPU."""
    flat = values.reshape(-1)
    idx = torch.randint(0, flat.numel(), (k,), generator=gen).to(flat.device)
    return flat[idx].float().cpu()


@torch.no_grad()
def collect_activation_stats(model: nn.Module, tokenizer, texts: Sequence[str], *, max_tokens: int = 16384,
                             seq_len: int = 512, progress: bool = True, samples: int = 1 << 18,
                             cache_tokens: int = 1024, batch_size: int = 4, seed: int = 0) -> ActivationStats:
    """One calibration pass over the dense model: per layer ``samples`` random entries of |x|, |h| and
    |act(gate)| (sorted) and ``cache_tokens`` random FFN inputs (for the greedy allocation)."""
    if state_of(model).config is not None:
        raise PrunePathError("TEAL / CATS calibrate the original dense model, not a converted one; load the model "
                             "it was converted from")
    if stats_activation_modules(model):
        raise PrunePathError("this model has activation sparsity applied; remove_activation_sparsity(model) first "
                             "(calibration needs the dense activations)")
    adapter = adapter_for(model)
    sites = adapter.sites(model)
    if not sites:
        raise PrunePathError(f"found no FFN in this {adapter.name} model; nothing to calibrate")
    batches = calibration_batches(model, tokenizer, texts, max_tokens=max_tokens, seq_len=seq_len,
                                  batch_size=batch_size)
    ffns = [adapter.extract(s) for s in sites]
    gated = ffns[0].gated
    n_batches = len(batches)
    per_batch = max(1, math.ceil(samples / n_batches))
    rows_per_batch = max(1, math.ceil(cache_tokens / n_batches))
    gen = torch.Generator().manual_seed(seed)
    xs: list[list[torch.Tensor]] = [[] for _ in sites]
    hs: list[list[torch.Tensor]] = [[] for _ in sites]
    gs: list[list[torch.Tensor]] = [[] for _ in sites]
    cache: list[list[torch.Tensor]] = [[] for _ in sites]

    def hook(i: int):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            f = ffns[i]
            if f.gated:
                a = f.activation(F.linear(x, f.gate_w, f.gate_b))
                h = a * F.linear(x, f.up_w, f.up_b)
                gs[i].append(_sample(a.abs(), per_batch, gen))
            else:
                h = f.activation(F.linear(x, f.up_w, f.up_b))
            xs[i].append(_sample(x.abs(), per_batch, gen))
            hs[i].append(_sample(h.abs(), per_batch, gen))
            rows = torch.randperm(x.shape[0], generator=gen)[:rows_per_batch].to(x.device)
            cache[i].append(x[rows].float().cpu())
        return fn

    modules = [getattr(s.owner, s.attr) for s in sites]
    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
    device = next(model.parameters()).device
    # The backbone alone: the LM head's vocabulary-sized logits are not needed for FFN statistics.
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix) if prefix and isinstance(getattr(model, prefix, None), nn.Module) else model
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for b in tqdm(batches, desc="activation stats", disable=not progress, unit="batch"):
            kwargs = {"use_cache": False} if _takes_cache(model) else {}
            body(input_ids=b.to(device), **kwargs)
            tokens += b.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if any(not x for x in xs):
        raise PrunePathError("calibration saw no input for some FFN; is the model's forward skipping layers?")
    srt = lambda parts: torch.sort(torch.cat(parts)).values  # noqa: E731
    return ActivationStats(
        x_abs=[srt(p) for p in xs], h_abs=[srt(p) for p in hs], gate_abs=[srt(p) for p in gs] if gated else None,
        inputs=[torch.cat(p)[:cache_tokens] for p in cache], ffns=ffns, gated=gated, adapter=adapter.name,
        tokens=tokens)


def _takes_cache(model: nn.Module) -> bool:
    """Causal LMs accept ``use_cache`` (off: no KV cache is built during calibration); encoders may not."""
    return bool(getattr(getattr(model, "config", None), "use_cache", False))
