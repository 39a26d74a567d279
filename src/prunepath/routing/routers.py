"""Router modules: map the FFN input to one score per expert. The paper's is a zero-initialised, bias-free
linear layer; baselines register others (MLP routers) with :func:`register_router`."""

from __future__ import annotations

from typing import Callable

from torch import nn

from prunepath.errors import PrunePathError


def linear_router(hidden_size: int, num_experts: int, **kwargs) -> nn.Module:
    router = nn.Linear(hidden_size, num_experts, bias=False, dtype=kwargs.get("dtype"), device=kwargs.get("device"))
    nn.init.zeros_(router.weight)
    return router


_ROUTERS: dict[str, Callable[..., nn.Module]] = {"linear": linear_router}


def register_router(name: str, factory: Callable[..., nn.Module]) -> None:
    _ROUTERS[name] = factory


def make_router(kind: str, hidden_size: int, num_experts: int, **kwargs) -> nn.Module:
    """Build a router of ``kind``; ``kwargs`` carries dtype/device and kind-specific options."""
    if kind not in _ROUTERS:
        raise PrunePathError(f"unknown router kind {kind!r}; known: {', '.join(sorted(_ROUTERS))}")
    return _ROUTERS[kind](hidden_size, num_experts, **kwargs)
