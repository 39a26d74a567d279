"""Baselines run by the same tool on the same experts: LTE, MoEfication top-k, D2DMoE dynamic-k, Wanda and static
expert pruning (docs/baselines.md). Their routing methods, routers, and LTE's auxiliary losses and stage hook are
registered by :mod:`prunepath.registrations` (imported once by the front door).

    prepare(model, "lte")                     # LTE router, soft routing (stage 1 of training)
    prepare(model, "moefication", k=12)       # MoEfication router, top-k (fit it: fitting.fit_router)
    prepare(model, "d2dmoe", tau=0.5)         # D2DMoE router, dynamic-k
    prepare(model, "static", tokenizer=tok, texts=calib, sparsity=0.5)
    prepare(model, "wanda", tokenizer=tok, texts=calib, sparsity=0.5)
    prepare(model, "teal", tokenizer=tok, texts=calib, sparsity=0.4)   # dense model; also "cats" (activation.py)
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from prunepath.baselines import d2dmoe, lte, moefication, static  # noqa: F401  (the submodules, as attributes)
from prunepath.baselines import wanda  # noqa: F401
from prunepath.baselines.fitting import fit_router
from prunepath.baselines.static import prune_experts
from prunepath.baselines.wanda import apply_wanda, weight_sparsity
from prunepath.baselines.activation import (ActivationSparsity, ActivationStats, apply_activation_sparsity,
                                            cats_thresholds, collect_activation_stats, remove_activation_sparsity,
                                            teal_thresholds)
from prunepath.errors import PrunePathError
from prunepath.conversion.moefy import prunepath_modules
from prunepath.routing.control import configure
from prunepath.routing.control import set_router
from prunepath.state import state_of

METHODS = ("prunepath", "lte", "moefication", "d2dmoe", "static", "wanda")

__all__ = ["METHODS", "ActivationSparsity", "ActivationStats", "apply_activation_sparsity", "apply_wanda",
           "cats_thresholds", "collect_activation_stats", "fit_router", "prepare", "prepare_for_training",
           "prune_experts", "remove_activation_sparsity", "teal_thresholds", "weight_sparsity"]

ACTIVATION = ("teal", "cats")  # activation sparsity on the dense model (no experts)

TRAINABLE = ("lte",)


def prepare(model: nn.Module, method: str, *, tokenizer=None, texts: Sequence[str] | None = None,
            sparsity: float | None = None, k: int | None = None, tau: float | None = None,
            threshold: float = lte.DEFAULT_THRESHOLD, soft: bool = True, router_kwargs: dict | None = None,
            fit: bool = False, fit_kwargs: dict | None = None, scope: str = "ffn") -> nn.Module:
    """Set router + routing on a converted model for ``method`` (Wanda also accepts a dense model).

    - prunepath: keeps the router, routing method "prunepath" (τ if given).
    - lte: LTE router; soft routing for training stage 1 (``soft=False`` for hard routing at δ=``threshold``).
    - moefication / d2dmoe: their MLP router and top-k (``k``) / dynamic-k (``tau``) routing; ``fit=True``
      fits the router on ``texts`` with the backbone frozen (``fit_kwargs`` go to :func:`fit_router`).
    - static / wanda: calibrate on ``texts`` and prune to ``sparsity``.
    - teal / cats: on the dense model, calibrate thresholds on ``texts`` for target s_FFN ``sparsity`` (TEAL
      uniform; for greedy or to reuse one calibration call the functions of :mod:`.activation` directly).
    """

    converted = state_of(model).config is not None
    if method == "wanda":
        if sparsity is None or tokenizer is None or not texts:
            raise PrunePathError("prepare(model, 'wanda') needs tokenizer=, texts= (calibration) and sparsity=")
        apply_wanda(model, tokenizer, texts, sparsity, scope=scope)
        return model
    if method in ACTIVATION:
        if sparsity is None or tokenizer is None or not texts:
            raise PrunePathError(f"prepare(model, {method!r}) needs tokenizer=, texts= (calibration) and sparsity=")
        stats = collect_activation_stats(model, tokenizer, texts)
        spec = cats_thresholds(stats, sparsity) if method == "cats" else teal_thresholds(stats, sparsity)
        return apply_activation_sparsity(model, spec)
    if method not in METHODS:
        raise PrunePathError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS)}")
    if not converted:
        raise PrunePathError(f"method {method!r} needs a converted model: run prunepath.moefy(model) first")
    if method == "static":
        if sparsity is None or tokenizer is None or not texts:
            raise PrunePathError("prepare(model, 'static') needs tokenizer=, texts= (calibration) and sparsity=")
        prune_experts(model, tokenizer, texts, sparsity)
    elif method == "prunepath":
        configure(model, method="prunepath", tau=tau)
    elif method == "lte":
        set_router(model, "lte", **(router_kwargs or {}))
        configure(model, method="lte", params={"soft": bool(soft), "threshold": float(threshold)})
    else:
        if fit:
            if tokenizer is None or not texts:
                raise PrunePathError(f"prepare(model, {method!r}, fit=True) needs tokenizer= and texts=")
            fit_router(model, tokenizer, texts, method=method, router_kwargs=router_kwargs, **(fit_kwargs or {}))
        else:
            set_router(model, method, **(router_kwargs or {}))
            if method == "moefication":
                for ffn in prunepath_modules(model):
                    ffn.router.init_from_centroids(ffn)
        configure(model, method=method, k=k, tau=tau)
    return model


def prepare_for_training(model: nn.Module, cfg) -> nn.Module:
    """What the trainer must do for a baseline ``cfg.method`` on a converted model *before* it builds the
    optimiser: LTE gets its own router (``method_params["init_bias"]``, default 0) and soft routing. The other
    baselines are not trained by the trainer (fit_router / apply_wanda / prune_experts instead)."""

    method = cfg.method
    if method not in TRAINABLE:
        raise PrunePathError(f"method {method!r} is not trained with the trainer: use "
                             "prunepath.baselines.fit_router (moefication, d2dmoe), apply_wanda or prune_experts")
    params = dict(getattr(cfg, "method_params", None) or {})
    if state_of(model).config.router != "lte":
        set_router(model, "lte", init_bias=float(params.get("init_bias", 0.0)))
    configure(model, method="lte", params={"soft": True,
                                           "threshold": float(params.get("threshold", lte.DEFAULT_THRESHOLD))})
    return model
