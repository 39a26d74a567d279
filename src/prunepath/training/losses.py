"""Auxiliary routing losses (PAPER.md §4), one set per method, added to the task loss by the trainer.

A loss function gets the router scores of every PrunePath layer (with their graph), the non-pad token mask and
the :class:`TrainConfig`, and returns **weighted** terms ``{name: tensor}``; the names show up in the progress bar
and the JSONL log. Baselines register their own with :func:`register_aux_loss`.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from prunepath.errors import PrunePathError

AuxLossFn = Callable[..., dict[str, torch.Tensor]]
_LOSSES: dict[str, AuxLossFn] = {}


def register_aux_loss(method: str, fn: AuxLossFn) -> None:
    """Register ``fn(scores, token_mask, cfg) -> {name: weighted term}`` for ``method``.

    ``fn`` may also accept a keyword ``always_on`` (a list of bool [E] tensors, one per layer).
    """
    _LOSSES[method] = fn


def get_aux_loss(method: str) -> AuxLossFn | None:
    """The loss function of ``method`` (None: no auxiliary loss, e.g. dense fine-tuning)."""
    return _LOSSES.get(method)


def call_aux_loss(fn: AuxLossFn, scores, token_mask, cfg, always_on=None) -> dict[str, torch.Tensor]:
    if always_on is not None and "always_on" in inspect.signature(fn).parameters:
        return fn(scores, token_mask, cfg, always_on=always_on)
    return fn(scores, token_mask, cfg)


def _flatten(scores: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """[..., E] scores of the kept tokens as [N, E] float32."""
    s = scores.float()
    if token_mask is None:
        return s.reshape(-1, s.shape[-1])
    m = token_mask.to(torch.bool).to(s.device).reshape(-1)
    s = s.reshape(-1, s.shape[-1])
    if m.numel() != s.shape[0]:
        raise PrunePathError(f"token mask has {m.numel()} entries but the router saw {s.shape[0]} tokens")
    return s[m]


def routing_terms(scores: torch.Tensor, token_mask: torch.Tensor | None = None,
                  always_on: torch.Tensor | None = None, gate_offset: float = 0.0) -> dict[str, torch.Tensor]:
    """Unweighted L_ent, L_bal, L_gate of one layer (float32, differentiable).

    L_ent = mean_i H(p_i); L_bal = E · Σ_j (mean_i p_ij)² (1 when usage is uniform); L_gate = mean_ij
    sigmoid(g_ij + offset). Always-on experts are outside the softmax (they do not use the budget), as in routing.
    """
    g = _flatten(scores, token_mask)
    if g.shape[0] == 0:
        zero = scores.sum() * 0.0
        return {"ent": zero, "bal": zero, "gate": zero}
    gate = torch.sigmoid(g + gate_offset).mean()
    if always_on is not None and bool(always_on.any()):
        g = g[:, ~always_on.to(g.device)]
    logp = torch.log_softmax(g, dim=-1)
    p = logp.exp()
    ent = -(p * logp).sum(-1).mean()
    bal = g.shape[-1] * (p.mean(0) ** 2).sum()
    return {"ent": ent, "bal": bal, "gate": gate}


def prunepath_aux_loss(scores: list[torch.Tensor], token_mask: torch.Tensor | None, cfg,
                       *, always_on: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """η·L_ent + λ·L_bal (+ γ·L_gate), each averaged over layers (PAPER.md §4)."""
    if not scores:
        return {}
    offset = float(getattr(cfg, "gate_offset", 0.0) or 0.0)
    per_layer = [routing_terms(s, token_mask, always_on[i] if always_on else None, offset)
                 for i, s in enumerate(scores)]
    mean = {k: torch.stack([t[k] for t in per_layer]).mean() for k in ("ent", "bal", "gate")}
    out = {"ent": cfg.eta * mean["ent"], "bal": cfg.lam * mean["bal"]}
    if cfg.gamma:
        out["gate"] = cfg.gamma * mean["gate"]
    return out



def router_distill_kl(logits: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor | None = None,
                      always_on: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over (unmasked) tokens of KL(q ‖ softmax(router logits)), with q the per-token expert shares of the
    true output. Always-on experts are outside the softmax, as in routing; q is renormalised over the rest."""
    g, q = _flatten(logits, token_mask).float(), _flatten(target, token_mask).float()
    if g.shape[0] == 0:
        return logits.sum() * 0.0
    if always_on is not None and bool(always_on.any()):
        keep = ~always_on.to(g.device)
        g, q = g[:, keep], q[:, keep]
        q = q / q.sum(-1, keepdim=True).clamp_min(1e-12)
    return (q * (q.clamp_min(1e-12).log() - torch.log_softmax(g, -1))).sum(-1).mean()


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) of the next-token distributions, mean over the positions whose next label is scored
    (``labels[:, 1:] != -100``, the causal-LM shift), times T² so its gradient scale does not depend on T."""
    s = student_logits[:, :-1].float() / temperature
    t = teacher_logits[:, :-1].float() / temperature
    keep = labels[:, 1:].to(s.device) != -100
    if not bool(keep.any()):
        return s.sum() * 0.0
    s, t = s[keep], t[keep]
    log_t = torch.log_softmax(t, -1)
    kl = (log_t.exp() * (log_t - torch.log_softmax(s, -1))).sum(-1)
    return kl.mean() * temperature ** 2
