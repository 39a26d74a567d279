"""In-expert activation sparsity (beyond the paper): TEAL-style magnitude thresholds inside the active experts.

A PrunePath FFN skips whole experts; inside the experts it runs, an FFN-input entry with |x_j| ≤ t_in does not
need its gate/up columns and an intermediate entry with |h_i| ≤ t_mid does not need its down row. The thresholds
are per layer, calibrated on calibration text (never the evaluation text) with every expert on, for a byte-level
fraction f: the same fraction of x and h entries (TEAL's uniform rule), f shifted towards h by a fixed bias κ
(:func:`prunepath.routing.config.inner_split`, what training with ``inner_mid_bias`` uses), or split per layer
by TEAL's block-wise greedy on the layer's output error (``allocation="block"``). They are stored in
``RoutingConfig.inner`` (so a saved checkpoint keeps them). Training with ``inner_sparsity_max`` teaches the
model to live with them.

    stats = collect_inner_stats(model, tok, "mix:sotu,brown")      # one calibration pass, any fraction after it
    apply_inner(model, inner_spec(stats, 0.3))                     # then evaluate at any τ
    apply_inner(model, inner_spec(stats, 0.4, allocation="block", model=model))
    apply_inner(model, None)                                       # off again

s_FFN then counts bytes, not experts (:func:`prunepath.stats.inner_s_per_token`). The decode engine skips those
bytes where every expert runs unscaled (an ungated checkpoint at τ > 1: :mod:`prunepath.kernels.thresholds`).
With experts also dropped or gated it runs them inside the expert kernels, which skip dropped intermediates' down
rows but not the gate/up bytes of dropped inputs (there that share of s_FFN is quality, not yet speed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunepath.baselines.activation import quantile_threshold, relative_error, split_greedy
from prunepath.errors import PrunePathError
from prunepath.evaluation.allocation import _run_windows, calibration_ids
from prunepath.evaluation.common import pad_id
from prunepath.models.adapters import ffn_byte_weights, needs_bos
from prunepath.routing.config import TAU_ALL, inner_split, validate_sparsity_fraction
from prunepath.routing.control import configure, routing_scope
from prunepath.routing.ffn import prunepath_modules
from prunepath.state import state_of


@dataclass
class InnerStats:
    """Sorted samples of |x| (FFN input) and |h| (intermediate) per layer, from one all-expert calibration pass,
    and some of each layer's input rows (for the block allocation)."""

    x_abs: list[torch.Tensor]
    h_abs: list[torch.Tensor]
    tokens: int
    source: str
    inputs: list[torch.Tensor] | None = None


@torch.no_grad()
def collect_inner_stats(model: nn.Module, tokenizer, calib, *, max_tokens: int = 16384, window: int = 512,
                        batch_size: int = 4, samples_per_layer: int = 1 << 20, keep_inputs: int = 2048,
                        seed: int = 0, progress: bool = False) -> InnerStats:
    """One forward over the calibration windows with every expert on and no thresholds, sampling (at random, at
    most ``samples_per_layer`` per tensor) the |x| and |h| entries of every PrunePath FFN on non-padding tokens.

    ``calib``: texts, token ids, a text file or a registry corpus name (as for per-layer allocation). The first
    ``keep_inputs`` input rows of every layer are kept as well, for ``inner_spec(..., allocation="block")``.
    """
    if state_of(model).config is None:
        raise PrunePathError("in-expert thresholds need a converted model (prunepath.moefy or a PrunePath "
                             "checkpoint); for a dense model use TEAL (prunepath baseline --method teal)")
    ids = calibration_ids(tokenizer, calib, max_tokens)
    if ids.numel() < window:
        raise PrunePathError(f"the calibration text has {ids.numel()} tokens, fewer than one {window}-token window; "
                             "give a longer text or a registry corpus (e.g. mix:sotu,moby-dick,austen,brown)")
    mods = prunepath_modules(model)
    xs: list[list[torch.Tensor]] = [[] for _ in mods]
    hs: list[list[torch.Tensor]] = [[] for _ in mods]
    rows: list[list[torch.Tensor]] = [[] for _ in mods]
    gen = torch.Generator().manual_seed(seed)
    windows = max(1, ids.numel() // window)
    per_batch = max(1, samples_per_layer * batch_size // windows)
    current: dict = {}

    def sample(v: torch.Tensor) -> torch.Tensor:
        v = v.abs().float().reshape(-1)
        if v.numel() > per_batch:
            v = v[torch.randint(v.numel(), (per_batch,), generator=gen).to(v.device)]
        return v.cpu()

    def hook(i: int):
        def pre(module, args):
            x = args[0]
            mask = current.get("mask")
            if mask is not None:
                x = x[mask.to(torch.bool).reshape(x.shape[:-1])]
            xs[i].append(sample(x))
            hs[i].append(sample(module.intermediate(x)))
            have = sum(r.shape[0] for r in rows[i])
            if have < keep_inputs:
                rows[i].append(x.reshape(-1, x.shape[-1])[:keep_inputs - have].detach().cpu())
        return pre

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(mods)]
    was_training = model.training
    model.eval()
    try:
        with routing_scope(model, tau=TAU_ALL, inner={}):
            bos = int(tokenizer.bos_token_id) if tokenizer is not None and needs_bos(model, tokenizer) else None
            _run_windows(model, ids, window, bos, pad_id(tokenizer), before=lambda m: current.update(mask=m),
                         batch_size=batch_size, progress=progress, desc="inner calibration")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    source = calib if isinstance(calib, str) else f"{type(calib).__name__}"
    return InnerStats([torch.cat(v).sort().values for v in xs], [torch.cat(v).sort().values for v in hs],
                      int(ids.numel()), str(source), [torch.cat(r) if r else None for r in rows])


ALLOCATIONS = ("uniform", "block")


def inner_spec(stats: InnerStats, fraction: float, *, mid_bias: float = 0.0, allocation: str = "uniform",
               model: nn.Module | None = None) -> dict:
    """The ``RoutingConfig.inner`` mapping for a byte-level in-expert fraction (on the calibration data, every
    expert on). ``uniform``: every layer thresholds (f_in, f_mid) = :func:`inner_split` (f, ``mid_bias``) of its
    x and h entries (κ = 0: f and f, TEAL's rule). ``block``: every layer at f bytes, split between x and h by
    TEAL's block-wise greedy on that layer's output error over the cached inputs (needs ``model``). ``model``
    also tells each layer's FFN type for the uniform split (gated when it is omitted)."""
    f = validate_sparsity_fraction(fraction, "inner sparsity")
    if allocation not in ALLOCATIONS:
        raise PrunePathError(f"unknown in-expert allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    if allocation == "block":
        if model is None:
            raise PrunePathError("the block allocation measures each layer's output error: pass model=")
        pairs = _block_pairs(model, stats, f)
    else:
        gated = [m.gated for m in prunepath_modules(model)] if model is not None else [True] * len(stats.x_abs)
        pairs = [inner_split(f, mid_bias, g) for g in gated]
    return {"target": f, "t_in": [quantile_threshold(x, a) for x, (a, _) in zip(stats.x_abs, pairs)],
            "t_mid": [quantile_threshold(h, b) for h, (_, b) in zip(stats.h_abs, pairs)],
            "f_in": [round(a, 4) for a, _ in pairs], "f_mid": [round(b, 4) for _, b in pairs],
            "calibration": {"tokens": stats.tokens, "source": stats.source, "rule": allocation,
                            **({"mid_bias": float(mid_bias)} if allocation == "uniform" else {})}}


@torch.no_grad()
def _block_pairs(model: nn.Module, stats: InnerStats, f: float) -> list[tuple[float, float]]:
    """Per layer, (f_in, f_mid) at f bytes from TEAL's block-wise greedy on the layer's relative output error."""
    mods = prunepath_modules(model)
    if not stats.inputs or len(stats.inputs) != len(mods) or any(x is None for x in stats.inputs):
        raise PrunePathError("the block allocation needs the calibration inputs: collect_inner_stats(..., "
                             "keep_inputs=N) with N > 0, on this model")
    out = []
    with routing_scope(model, tau=TAU_ALL, inner={}):
        for i, m in enumerate(mods):
            p = next(m.parameters())
            x = stats.inputs[i].to(p.device, p.dtype)
            y0 = m.thresholded_forward(x, None, None)

            def error(a: float, b: float, m=m, x=x, y0=y0, i=i) -> float:
                return relative_error(m.thresholded_forward(x, quantile_threshold(stats.x_abs[i], a),
                                                            quantile_threshold(stats.h_abs[i], b)), y0)

            out.append(split_greedy(error, f, ffn_byte_weights(m.gated)))
    return out


def apply_inner(model: nn.Module, spec: dict | None) -> dict:
    """Set (or with None / {} clear) the in-expert thresholds of every PrunePath FFN; returns the new spec."""
    return configure(model, inner=dict(spec or {})).inner
