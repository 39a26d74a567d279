"""Finding a method's knob (τ, δ, k) for a target s_FFN on cached FFN inputs (router-only, no full forward)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from prunepath.errors import PrunePathError
from prunepath.conversion.moefy import prunepath_modules
from prunepath.routing.control import routing
from prunepath.state import state_of

# knob name, search range, whether s_FFN grows with the knob
KNOBS = {"prunepath": ("tau", 0.0, 1.0, False), "d2dmoe": ("tau", 0.0, 1.0, False),
         "lte": ("threshold", 0.0, 1.0, True), "moefication": ("k", None, None, False)}


@torch.no_grad()
def sparsity_on_inputs(model: nn.Module, inputs: Sequence[torch.Tensor], **settings) -> float:
    """s_FFN the current routing (changed temporarily by ``settings``, as for ``prunepath.routing``) would give
    on cached per-layer FFN inputs."""

    mods = prunepath_modules(model)
    with routing(model, **settings):
        fracs = []
        for ffn, x in zip(mods, inputs):
            x = x.to(ffn.up_proj.weight.device, ffn.up_proj.weight.dtype)
            _, mask = ffn.expert_weights(x)
            fracs.append(mask.float().mean().item())
    return 1.0 - sum(fracs) / len(fracs)


def knob_for_sparsity(model: nn.Module, inputs: Sequence[torch.Tensor], method: str, target: float, *,
                      iters: int = 14, base: dict | None = None) -> tuple[float, float]:
    """(knob value, s_FFN it gives on ``inputs``) closest to ``target`` by bisection; k for MoEfication is
    exact: round((1 − target) · E)."""
    if method not in KNOBS:
        raise PrunePathError(f"no sparsity knob known for method {method!r}; known: {', '.join(KNOBS)}")
    if not 0.0 <= target < 1.0:
        raise PrunePathError(f"target sparsity must be in [0, 1) (got {target})")
    name, lo, hi, increasing = KNOBS[method]
    cfg = state_of(model).config
    base = dict(base or {})
    if method == "moefication":
        k = max(1, int(round((1.0 - target) * cfg.num_experts)))
        return float(k), sparsity_on_inputs(model, inputs, method=method, k=k, **base)

    def s_at(v: float) -> float:
        if name == "threshold":
            params = {**cfg.routing.params, **base.pop("params", {}), "soft": False, "threshold": v}
            return sparsity_on_inputs(model, inputs, method=method, params=params, **base)
        return sparsity_on_inputs(model, inputs, method=method, tau=max(v, 1e-6), **base)

    best = (lo, s_at(lo))
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        s = s_at(mid)
        if abs(s - target) < abs(best[1] - target):
            best = (mid, s)
        if (s < target) == increasing:
            lo = mid
        else:
            hi = mid
    return best
