"""In-expert activation sparsity (beyond the paper): TEAL-style magnitude thresholds inside the active experts.

A PrunePath FFN skips whole experts; inside the experts it runs, an FFN-input entry with |x_j| ≤ t_in does not
need its gate/up columns and an intermediate entry with |h_i| ≤ t_mid does not need its down row. The thresholds
are per layer, calibrated on calibration text (never the evaluation text) with every expert on, at one fraction f
of the entries for both tensors (TEAL's uniform rule), and stored in ``RoutingConfig.inner`` (so a saved
checkpoint keeps them). Training with ``inner_sparsity_max`` teaches the model to live with them.

    stats = collect_inner_stats(model, tok, "mix:sotu,brown")      # one calibration pass, any fraction after it
    apply_inner(model, inner_spec(stats, 0.3))                     # then evaluate at any τ
    apply_inner(model, None)                                       # off again

s_FFN then counts bytes, not experts (:meth:`prunepath.routing.ffn.PrunePathFFN._inner_s`): the decode kernels do
not skip entries inside an expert yet, so this is a quality measurement of what such a kernel could save.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunepath.baselines.activation import quantile_threshold
from prunepath.errors import PrunePathError
from prunepath.evaluation.allocation import _run_windows, calibration_ids
from prunepath.evaluation.common import pad_id
from prunepath.models.adapters import needs_bos
from prunepath.routing.config import TAU_ALL, validate_sparsity_fraction
from prunepath.routing.control import configure, routing_scope
from prunepath.routing.ffn import prunepath_modules
from prunepath.state import state_of


@dataclass
class InnerStats:
    """Sorted samples of |x| (FFN input) and |h| (intermediate) per layer, from one all-expert calibration pass."""

    x_abs: list[torch.Tensor]
    h_abs: list[torch.Tensor]
    tokens: int
    source: str


@torch.no_grad()
def collect_inner_stats(model: nn.Module, tokenizer, calib, *, max_tokens: int = 16384, window: int = 512,
                        batch_size: int = 4, samples_per_layer: int = 1 << 20, seed: int = 0,
                        progress: bool = False) -> InnerStats:
    """One forward over the calibration windows with every expert on and no thresholds, sampling (at random, at
    most ``samples_per_layer`` per tensor) the |x| and |h| entries of every PrunePath FFN on non-padding tokens.

    ``calib``: texts, token ids, a text file or a registry corpus name (as for per-layer allocation).
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
                      int(ids.numel()), str(source))


def inner_spec(stats: InnerStats, fraction: float) -> dict:
    """The ``RoutingConfig.inner`` mapping that zeroes a ``fraction`` of the entries of x and of h in every layer
    (on the calibration data, every expert on)."""
    f = validate_sparsity_fraction(fraction, "inner sparsity")
    return {"target": f, "t_in": [quantile_threshold(x, f) for x in stats.x_abs],
            "t_mid": [quantile_threshold(h, f) for h in stats.h_abs],
            "calibration": {"tokens": stats.tokens, "source": stats.source, "rule": "uniform"}}


def apply_inner(model: nn.Module, spec: dict | None) -> dict:
    """Set (or with None / {} clear) the in-expert thresholds of every PrunePath FFN; returns the new spec."""
    return configure(model, inner=dict(spec or {})).inner
