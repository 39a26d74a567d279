"""Changing routing at run time on a converted model (one checkpoint, a sparsity knob)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

from torch import nn

from prunepath.errors import PrunePathError
from prunepath.routing.config import RoutingConfig

FIELDS = ("tau", "rule", "k", "gates", "gate_offset", "layer_tau", "method", "params", "allocation")


def _require_converted(model: nn.Module):
    cfg = getattr(model, "prunepath_config", None)
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
) -> RoutingConfig:
    """Change routing on every PrunePath FFN of ``model``; arguments left as None keep their value.

    Validates before changing anything, so a bad value leaves the model as it was. Returns the new settings.
    """
    from prunepath.conversion.moefy import prunepath_modules

    cfg = _require_converted(model)
    current = cfg.routing
    updates = {name: value for name, value in
               dict(tau=tau, rule=rule, k=k, gates=gates, gate_offset=gate_offset, layer_tau=layer_tau,
                    method=method, params=params, allocation=allocation).items()
               if value is not None}
    new = replace(current, **updates)  # __post_init__ validates
    for field_name in FIELDS:
        setattr(current, field_name, getattr(new, field_name))
    # Every FFN shares the same RoutingConfig object; re-point any that were given their own.
    for module in prunepath_modules(model):
        module.routing = current
    return current


@contextmanager
def routing(model: nn.Module, **settings) -> Iterator[RoutingConfig]:
    """Temporarily change routing (``with prunepath.routing(model, tau=0.6): ...``)."""
    cfg = _require_converted(model)
    saved = replace(cfg.routing, layer_tau=dict(cfg.routing.layer_tau), params=dict(cfg.routing.params),
                    allocation=dict(cfg.routing.allocation))
    try:
        yield configure(model, **settings)
    finally:
        for name in FIELDS:
            setattr(cfg.routing, name, getattr(saved, name))
