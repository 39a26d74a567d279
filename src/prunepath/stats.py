"""Sparsity statistics of the last forward pass (PAPER.md §3.5)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class SparsityStats:
    """s_ffn = 1 − mean over tokens and layers of |A| / E (the fraction of inactive experts)."""

    s_ffn: float
    mean_active: float  # experts per token per layer, averaged over layers
    num_experts: int
    tokens: int
    per_layer_active: list[float] = field(default_factory=list)
    per_layer_s_ffn: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(s_ffn=self.s_ffn, mean_active=self.mean_active, num_experts=self.num_experts,
                    tokens=self.tokens, per_layer_active=self.per_layer_active,
                    per_layer_s_ffn=self.per_layer_s_ffn)


def active_counts(model: nn.Module, token_mask: torch.Tensor | None = None, *,
                  keep_device: bool = False) -> list[torch.Tensor]:
    """Active-expert count per (kept) token, one 1-D tensor per layer, from the last forward (moved to the CPU
    unless ``keep_device``)."""
    from prunepath.conversion.moefy import prunepath_modules

    out = []
    for m in prunepath_modules(model):
        if m.last_active is None:
            raise RuntimeError("no forward pass recorded yet: run the model before asking for sparsity")
        a = m.last_active
        if token_mask is not None:
            a = a.reshape(token_mask.shape)[token_mask.to(torch.bool).to(a.device)]
        a = a.reshape(-1).float()
        out.append(a if keep_device else a.cpu())
    return out


def s_ffn_tensor(model: nn.Module, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``sparsity(model, token_mask).s_ffn`` as a 0-d tensor on the model's device: no host read, for hot loops."""
    counts = active_counts(model, token_mask, keep_device=True)
    return 1.0 - torch.stack([c.mean() for c in counts]).mean() / model.prunepath_config.num_experts


def sparsity(model: nn.Module, token_mask: torch.Tensor | None = None) -> SparsityStats:
    """Statistics of the last forward; ``token_mask`` (e.g. an attention mask) drops padding tokens.

    A dense, unconverted model reports s_ffn = 0.
    """
    cfg = getattr(model, "prunepath_config", None)
    if cfg is None:
        return SparsityStats(0.0, 0.0, 0, 0)
    counts = active_counts(model, token_mask)
    e = cfg.num_experts
    per_layer = [float(c.mean()) if c.numel() else float("nan") for c in counts]
    mean_active = sum(per_layer) / len(per_layer)
    return SparsityStats(
        s_ffn=1.0 - mean_active / e, mean_active=mean_active, num_experts=e,
        tokens=int(counts[0].numel()) if counts else 0, per_layer_active=per_layer,
        per_layer_s_ffn=[1.0 - a / e for a in per_layer],
    )
