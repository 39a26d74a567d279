"""LTE — Learn-To-be-Efficient (Zheng et al., NeurIPS 2024), the paper's main baseline (PAPER.md §6).

Same experts as PrunePath; each expert gets an independent sigmoid score s_e = sigmoid(g_e).
- Stage 1 (soft): y = Σ_e s_e · FFN_e(x) over *all* experts; loss = task + η · L_eff + μ · L_sep with
  L_eff = mean s (pushes gates to 0) and L_sep = mean 1 / ((s − δ)² + ε) (pushes scores away from δ).
- Stage 2 (hard): keep experts with s_e > δ (default 0.5), unweighted sum; the router is frozen and the model
  adapts with the task loss only.
Sparsity is steered by η at training time (one checkpoint per η) and by δ at inference.

Routing settings: ``RoutingConfig.params = {"soft": bool, "threshold": δ}`` (default hard, δ = 0.5).
Training settings (``TrainConfig.method_params``): ``eta`` (default 1e-2), ``sep_weight`` μ (default 1e-4),
``sep_eps`` ε (default 1e-3), ``threshold`` δ, ``soft_fraction`` (share of steps in stage 1 when the trainer
gives no explicit stage, default 0.5).
"""

from __future__ import annotations

import torch
from torch import nn

from prunepath.routing.config import RoutingConfig
from prunepath.routing.control import configure
from prunepath.routing.ffn import prunepath_modules
from prunepath.state import state_of

DEFAULT_THRESHOLD = 0.5
DEFAULT_ETA = 1e-2
DEFAULT_SEP_WEIGHT = 1e-4
DEFAULT_SEP_EPS = 1e-3


def lte_router(hidden_size: int, num_experts: int, *, dtype=None, device=None, init_bias: float = 0.0,
               **_: object) -> nn.Module:
    """Linear(d, E) with bias. Randomly initialised (not zero): at zero every score would sit exactly on δ,
    where the separability loss has no gradient."""
    router = nn.Linear(hidden_size, num_experts, bias=True, dtype=dtype, device=device)
    nn.init.constant_(router.bias, float(init_bias))
    return router


def lte_method(scores: torch.Tensor, routing: RoutingConfig, layer_index: int,
               always_on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft: every expert, weight sigmoid(g). Hard: experts with sigmoid(g) > δ, weight 1."""
    s = torch.sigmoid(scores.float())
    params = routing.params or {}
    if params.get("soft", False):
        mask = torch.ones_like(s, dtype=torch.bool)  # every expert runs: s_FFN = 0
        weights = torch.where(always_on, torch.ones_like(s), s)
    else:
        mask = (s > float(params.get("threshold", DEFAULT_THRESHOLD))) | always_on
        weights = mask.to(s.dtype)
    return weights, mask


def efficiency_loss(gates: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean gate value over kept tokens and experts (LTE's L_eff; its gradient pushes every gate down)."""
    if token_mask is not None:
        gates = gates[token_mask.to(torch.bool)]
    return gates.mean()


def separability_loss(gates: torch.Tensor, threshold: float = DEFAULT_THRESHOLD, eps: float = DEFAULT_SEP_EPS,
                      token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of 1 / ((s − δ)² + ε) (LTE's L_sep; ε keeps it finite at s = δ). Minimising it pushes s away from δ."""
    if token_mask is not None:
        gates = gates[token_mask.to(torch.bool)]
    return (1.0 / ((gates - threshold) ** 2 + eps)).mean()


def _params(cfg) -> dict:
    return dict(getattr(cfg, "method_params", None) or {})


def lte_aux_loss(scores: list[torch.Tensor], token_mask: torch.Tensor | None, cfg) -> dict[str, torch.Tensor]:
    """Weighted LTE terms for the trainer, averaged over layers: {"lte_efficiency": η·L_eff, "lte_separability": μ·L_sep}.

    Only in stage 1 (soft); in stage 2 the router is frozen and LTE trains on the task loss alone, so the terms
    are zero there (the stage hook records the phase in ``cfg.method_params["lte_phase"]``)."""
    p = _params(cfg)
    ref = scores[0]
    if p.get("lte_phase", "soft") != "soft":
        zero = ref.new_zeros(())
        return {"lte_efficiency": zero, "lte_separability": zero}
    eta = float(p.get("eta", DEFAULT_ETA))
    mu = float(p.get("sep_weight", DEFAULT_SEP_WEIGHT))
    delta = float(p.get("threshold", DEFAULT_THRESHOLD))
    eps = float(p.get("sep_eps", DEFAULT_SEP_EPS))
    eff = sep = ref.new_zeros((), dtype=torch.float32)
    for sc in scores:
        g = torch.sigmoid(sc.float())
        tm = token_mask.reshape(g.shape[:-1]) if token_mask is not None else None
        eff = eff + efficiency_loss(g, tm)
        sep = sep + separability_loss(g, delta, eps, tm)
    n = max(len(scores), 1)
    return {"lte_efficiency": eta * eff / n, "lte_separability": mu * sep / n}


def is_soft_stage(stage, step: int, total_steps: int, cfg=None) -> bool:
    """Stage 1 is soft. Accepts a stage name ("soft"/"warmup"/"stage1"), a 1-based number (1 = soft), or, when
    the trainer gives no stage, the first ``soft_fraction`` of the steps."""
    if isinstance(stage, str):
        s = stage.lower()
        if s in ("soft", "warmup", "stage1", "1", "dense"):
            return True
        if s in ("hard", "stage2", "2", "sparse", "anneal"):
            return False
    if isinstance(stage, int) and not isinstance(stage, bool):
        return stage <= 1
    frac = float(_params(cfg).get("soft_fraction", 0.5)) if cfg is not None else 0.5
    return step < frac * max(int(total_steps), 1)


def lte_stage_hook(model: nn.Module, stage, step: int, total_steps: int, cfg) -> None:
    """Before each step: stage 1 soft (router trainable), stage 2 hard at δ with the router frozen."""
    soft = is_soft_stage(stage, step, total_steps, cfg)
    p = _params(cfg)
    delta = float(p.get("threshold", DEFAULT_THRESHOLD))
    routing = state_of(model).config.routing
    if routing.method != "lte" or routing.params.get("soft") != soft or routing.params.get("threshold") != delta:
        configure(model, method="lte", params={**routing.params, "soft": soft, "threshold": delta})
    for ffn in prunepath_modules(model):
        ffn.router.requires_grad_(soft)
    mp = getattr(cfg, "method_params", None)
    if isinstance(mp, dict):
        mp["lte_phase"] = "soft" if soft else "hard"
