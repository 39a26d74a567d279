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
        try:
            import prunepath.baselines  # noqa: F401  (registers baseline routers)
        except ImportError:
            pass
    if kind not in _ROUTERS:
        raise PrunePathError(f"unknown router kind {kind!r}; known: {', '.join(sorted(_ROUTERS))}")
    return _ROUTERS[kind](hidden_size, num_experts, **kwargs)


def set_router(model: nn.Module, kind: str, **router_kwargs) -> nn.Module:
    """Replace the router of every PrunePath FFN by a new one of ``kind`` (recorded in the model's config so
    that checkpoints rebuild it)."""
    from prunepath.conversion.moefy import prunepath_modules

    cfg = getattr(model, "prunepath_config", None)
    if cfg is None:
        raise PrunePathError("set_router needs a converted model (prunepath.moefy first)")
    for ffn in prunepath_modules(model):
        ref = ffn.up_proj.weight
        ffn.router = make_router(kind, ffn.hidden_size, ffn.num_experts, dtype=ref.dtype, device=ref.device,
                                 **router_kwargs)
    cfg.router = kind
    cfg.router_kwargs = dict(router_kwargs)
    return model
