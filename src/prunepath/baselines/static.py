"""Static expert pruning (structured, real speed): the same experts are dropped for every token, chosen by
their activation mass on calibration text; the rest run unweighted (so 0 % pruning is the dense model).

Stored as routing method "static" with ``RoutingConfig.params = {"off": {"<layer>": [expert ids]}}``, so it
survives ``prunepath.save`` / ``load`` and s_FFN counts the dropped experts.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from prunepath.baselines.calibration import expert_mass, run_batches, token_batches
from prunepath.errors import PrunePathError
from prunepath.routing.config import RoutingConfig
from prunepath.conversion.moefy import prunepath_modules
from prunepath.routing.control import configure


def static_method(scores: torch.Tensor, routing: RoutingConfig, layer_index: int,
                  always_on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed mask per layer; the router's scores are ignored."""
    keep = torch.ones(scores.shape[-1], dtype=torch.bool, device=scores.device)
    off = (routing.params or {}).get("off", {}).get(str(layer_index), [])
    if off:
        keep[torch.as_tensor(off, dtype=torch.long, device=scores.device)] = False
    keep = keep | always_on
    mask = keep.expand(scores.shape).clone()
    return mask.to(torch.float32), mask


def calibration_mass(model: nn.Module, tokenizer, calib_texts: Sequence[str], *, max_tokens: int = 16384,
                     seq_len: int = 256, progress: bool = True) -> list[torch.Tensor]:
    """Total activation mass of each expert on the calibration tokens, one [E] tensor per layer."""

    mods = prunepath_modules(model)
    if not mods:
        raise PrunePathError("static expert pruning needs a converted model: run prunepath.moefy(model) first")
    totals = [torch.zeros(m.num_experts, dtype=torch.float64) for m in mods]

    def hook(i):
        def fn(mod, args):
            totals[i] += expert_mass(mod, args[0]).reshape(-1, mod.num_experts).sum(0).double().cpu()
        return fn

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(mods)]
    try:
        run_batches(model, token_batches(tokenizer, calib_texts, seq_len=seq_len, max_tokens=max_tokens),
                    desc="static: expert mass", progress=progress)
    finally:
        for h in handles:
            h.remove()
    return totals


def experts_to_drop(mass: Sequence[torch.Tensor], sparsity: float,
                    always_on: Sequence[torch.Tensor] | None = None) -> dict[str, list[int]]:
    """Per layer, the round(sparsity · E) experts with the least mass (ties to the higher index), never an
    always-on expert, and never every expert."""
    if not 0.0 <= sparsity < 1.0:
        raise PrunePathError(f"sparsity must be in [0, 1) (got {sparsity}); e.g. 0.5 drops half the experts")
    off: dict[str, list[int]] = {}
    for i, m in enumerate(mass):
        e = m.numel()
        n = min(int(round(sparsity * e)), e - 1)
        order = torch.sort(m.double().cpu(), descending=True, stable=True).indices.flip(0)  # least first; ties: high idx
        if always_on is not None:
            order = order[~always_on[i].cpu()[order]]
        off[str(i)] = sorted(int(j) for j in order[:n])
    return off


def prune_experts(model: nn.Module, tokenizer, calib_texts: Sequence[str], sparsity: float, *,
                  max_tokens: int = 16384, seq_len: int = 256, progress: bool = True,
                  mass: Sequence[torch.Tensor] | None = None) -> dict[str, list[int]]:
    """Drop, in every layer, the experts with the least calibration activation mass (``sparsity`` of them) and
    switch routing to the fixed "static" method. Pass ``mass`` (from :func:`calibration_mass`) to reuse it."""

    if not 0.0 <= sparsity < 1.0:
        raise PrunePathError(f"sparsity must be in [0, 1) (got {sparsity}); e.g. 0.5 drops half the experts")
    if mass is None:
        mass = calibration_mass(model, tokenizer, calib_texts, max_tokens=max_tokens, seq_len=seq_len,
                                progress=progress)
    off = experts_to_drop(mass, sparsity, [m.always_on for m in prunepath_modules(model)])
    configure(model, method="static", params={"off": off, "sparsity": float(sparsity)})
    return off

