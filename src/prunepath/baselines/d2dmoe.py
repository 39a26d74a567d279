"""D2DMoE dynamic-k (Szatkowski et al., 2024): a router regresses each expert's output norm; a token keeps the
experts whose predicted norm is at least (1 − τ) · the largest one.

Router: Linear(d, w) → ReLU → Linear(w, E) → abs, fitted with the backbone frozen to ‖FFN_e(x)‖₂ (MSE; the
targets are divided by their per-layer mean, which leaves the relative selection rule unchanged).
Routing settings: ``RoutingConfig.tau`` (τ ≥ 1 keeps every expert, τ → 0 keeps only the largest).
Not reproduced: D2DMoE's activation-sparsity fine-tuning and GELU → ReLU replacement before conversion.
"""

from __future__ import annotations

import torch
from torch import nn

from prunepath.routing.config import RoutingConfig

DEFAULT_WIDTH = 128


class D2DMoERouter(nn.Module):
    """Linear(d, w) → ReLU → Linear(w, E) → abs: predicted output norm of each expert."""

    def __init__(self, hidden_size: int, num_experts: int, *, width: int = DEFAULT_WIDTH, dtype=None,
                 device=None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, width, dtype=dtype, device=device), nn.ReLU(),
                                 nn.Linear(width, num_experts, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).abs()


def d2dmoe_router(hidden_size: int, num_experts: int, *, dtype=None, device=None, width: int = DEFAULT_WIDTH,
                  **_: object) -> nn.Module:
    return D2DMoERouter(hidden_size, num_experts, width=int(width), dtype=dtype, device=device)


def dynamic_k_method(scores: torch.Tensor, routing: RoutingConfig, layer_index: int,
                     always_on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep experts with predicted norm ≥ (1 − τ) · max over experts (always ≥ 1 expert); unweighted."""
    pred = scores.float().abs()
    tau = routing.tau_for(layer_index)
    thr = (1.0 - tau) * pred.amax(-1, keepdim=True)
    mask = (pred >= thr) | always_on
    return mask.to(torch.float32), mask

