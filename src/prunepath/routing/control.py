"""Changing routing at run time on a converted model (one checkpoint, a sparsity knob)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

from torch import nn

from prunepath.errors import PrunePathError
from prunepath.routing.config import RoutingConfig
from prunepath.routing.ffn import prunepath_modules
from prunepath.routing.routers import make_router
from prunepath.state import state_of

FIELDS = ("tau", "rule", "k", "gates", "gate_offset", "layer_tau", "method", "params", "allocation", "inner")


def _require_converted(model: nn.Module):
    cfg = state_of(model).config
    if cfg is None:
        raise PrunePathError("this model has no PrunePath experts; convert it first with prunepath.moefy(model) "
                             "or load a PrunePath checkpoint with prunepath.load(path)")
    return cfg


def configure(
    model: nn.Module,
    tau: float | None = None,
    rule: str | None = None,
    k: int | None = None,
    gates: bool | None = None,
    *,
    gate_offset: float | None = None,
    layer_tau: dict[int, float] | None = None,
    method: str | None = None,
    params: dict | None = None,
    allocation: dict | None = None,
    inner: dict | None = None,
) -> RoutingConfig:
    """Change routing on every PrunePath FFN of ``model``; arguments left as None keep their value (``inner={}``
    switches the in-expert thresholds off).

    Validates before changing anything, so a bad value leaves the model as it was. Returns the new settings.
    """
    cfg = _require_converted(model)
    current = cfg.routing
    updates = {name: value for name, value in
               dict(tau=tau, rule=rule, k=k, gates=gates, gate_offset=gate_offset, layer_tau=layer_tau,
                    method=method, params=params, allocation=allocation, inner=inner).items()
               if value is not None}
    new = replace(current, **updates)  # __post_init__ validates
    if new.inner and len(new.inner["t_in"]) != cfg.num_layers:
        raise PrunePathError(f"inner thresholds for {len(new.inner['t_in'])} layers, but the model has "
                             f"{cfg.num_layers}; calibrate them on this model")
    for field_name in FIELDS:
        setattr(current, field_name, getattr(new, field_name))
    # Every FFN shares the same RoutingConfig object; re-point any that were given their own.
    for module in prunepath_modules(model):
        module.routing = current
    return current


@contextmanager
def routing_scope(model: nn.Module, **settings) -> Iterator[RoutingConfig]:
    """Temporarily change routing (``with prunepath.routing_scope(model, tau=0.6): ...``; the old name
    ``prunepath.routing`` still works, see ``prunepath/__init__.py``)."""
    cfg = _require_converted(model)
    saved = cfg.routing.copy()
    try:
        yield configure(model, **settings)
    finally:
        for name in FIELDS:
            setattr(cfg.routing, name, getattr(saved, name))


def set_router(model: nn.Module, kind: str, **router_kwargs) -> nn.Module:
    """Replace the router of every PrunePath FFN by a new one of ``kind`` (recorded in the model's config so
    that checkpoints rebuild it)."""
    cfg = state_of(model).config
    if cfg is None:
        raise PrunePathError("set_router needs a converted model (prunepath.moefy first)")
    for ffn in prunepath_modules(model):
        ref = ffn.up_proj.weight
        ffn.router = make_router(kind, ffn.hidden_size, ffn.num_experts, dtype=ref.dtype, device=ref.device,
                                 **router_kwargs)
    cfg.router = kind
    cfg.router_kwargs = dict(router_kwargs)
    return model


routing = routing_scope  # the old name (kept for existing code: prunepath.routing.control.routing)
