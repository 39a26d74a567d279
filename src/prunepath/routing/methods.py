"""Routing methods: how router scores become per-expert output weights and an active mask.

PrunePath's method is the default; baselines (LTE, MoEfication top-k, D2DMoE, ...) register their own with
:func:`register_method` so that they reuse the same experts, trainer, evaluation and kernels.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from prunepath.errors import PrunePathError
from prunepath.routing.config import RoutingConfig
from prunepath.routing.selection import select_experts


class RoutingMethod(Protocol):
    def __call__(self, scores: torch.Tensor, routing: RoutingConfig, layer_index: int,
                 always_on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights float32 [..., E] with 0 for inactive experts, mask bool [..., E]) from router scores."""


def prunepath_method(scores: torch.Tensor, routing: RoutingConfig, layer_index: int,
                     always_on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax ranks experts, the selection rule picks them, sigmoid(logit + offset) scales them (PAPER §3)."""
    logits = scores.float()
    tau = routing.tau_for(layer_index)
    if routing.every_expert(layer_index):
        mask = torch.ones_like(logits, dtype=torch.bool)
    else:
        sel_logits = logits
        if bool(always_on.any()):
            # Always-on experts run for every token and do not consume the probability budget.
            sel_logits = logits.masked_fill(always_on, float("-inf"))
        probs = torch.softmax(sel_logits, dim=-1)
        mask = select_experts(probs, tau, routing.rule, routing.k) | always_on
    if routing.gates:
        weights = torch.sigmoid(logits + routing.gate_offset) * mask
    else:
        weights = mask.to(logits.dtype)
    return weights, mask


_METHODS: dict[str, RoutingMethod] = {"prunepath": prunepath_method}


def register_method(name: str, fn: RoutingMethod) -> None:
    _METHODS[name] = fn


def get_method(name: str) -> RoutingMethod:
    if name not in _METHODS:
        raise PrunePathError(f"unknown routing method {name!r}; known: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def known_methods() -> list[str]:
    get_method("prunepath")
    return sorted(_METHODS)


MethodFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
