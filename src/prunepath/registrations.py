"""The one module that fills the registries: routing methods, routers, auxiliary losses, stage hooks and the
loaders of the PrunePath formats. The front door (``prunepath/__init__.py``) imports it once; lookups
(``get_method``, ``make_router``, ``get_aux_loss``, ``get_stage_hook``, the model loaders) never import anything —
an unknown name raises (or, for the optional training hooks, means "none").

Adding a method: write its module (route function, router factory, aux loss, stage hook) and register it here.
"""

from __future__ import annotations

from prunepath.baselines import activation, d2dmoe, lte, moefication, static
from prunepath.checkpoint import load as load_checkpoint
from prunepath.models.loading import register_loader
from prunepath.routing.methods import register_method
from prunepath.routing.routers import register_router
from prunepath.training.losses import prunepath_aux_loss, register_aux_loss
from prunepath.training.schedule import prunepath_stage_hook, register_stage_hook


def _apply_activation_spec(model, spec_path) -> None:
    activation.apply_activation_sparsity(model, activation.load_spec(spec_path))


def register_all() -> None:
    """Fill every registry (idempotent)."""
    # PrunePath itself ("prunepath" routing method and "linear" router are the routing package's built-ins).
    register_aux_loss("prunepath", prunepath_aux_loss)
    register_stage_hook("prunepath", prunepath_stage_hook)
    # LTE (routing, router, losses and the soft/hard stage hook)
    register_router("lte", lte.lte_router)
    register_method("lte", lte.lte_method)
    register_aux_loss("lte", lte.lte_aux_loss)
    register_stage_hook("lte", lte.lte_stage_hook)
    # MoEfication top-k, D2DMoE dynamic-k, static expert pruning
    register_router("moefication", moefication.moefication_router)
    register_method("moefication", moefication.topk_method)
    register_router("d2dmoe", d2dmoe.d2dmoe_router)
    register_method("d2dmoe", d2dmoe.dynamic_k_method)
    register_method("static", static.static_method)
    # Loading: PrunePath checkpoints and TEAL / CATS thresholds saved beside a dense model
    register_loader("checkpoint", load_checkpoint)
    register_loader("activation", _apply_activation_spec)


register_all()
