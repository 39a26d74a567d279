"""MoEfication top-k (Zhang et al., 2022): an MLP router predicts which experts carry the activation mass;
inference keeps a fixed top-k, unweighted.

Router: x / ‖x‖ → Linear(d, E) → tanh → Linear(E, E). The first layer starts from the cluster centroids (mean of
the L2-normalised gate / W₁ rows of each expert), the second from the identity. It is fitted with the backbone
frozen (``prunepath.baselines.fitting.fit_router(model, ..., method="moefication")``) to each expert's share of
the positive activation mass, max-normalised, with a BCE loss.

Routing settings: ``RoutingConfig.k`` (or ``params["k"]``) experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prunepath.errors import PrunePathError
from prunepath.routing.config import RoutingConfig


class MoEficationRouter(nn.Module):
    """x / ‖x‖ → Linear(d, E) → tanh → Linear(E, E) (logits of 'this expert carries mass')."""

    def __init__(self, hidden_size: int, num_experts: int, *, dtype=None, device=None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, num_experts, dtype=dtype, device=device)
        self.fc2 = nn.Linear(num_experts, num_experts, dtype=dtype, device=device)
        with torch.no_grad():
            self.fc2.weight.copy_(torch.eye(num_experts))
            self.fc2.bias.zero_()
            self.fc1.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(F.normalize(x, dim=-1))))

    @torch.no_grad()
    def init_from_centroids(self, ffn: nn.Module) -> None:
        """fc1 rows = centroid of each expert's L2-normalised gate (gated) or W₁ (plain) rows."""
        rows = (ffn.gate_proj if ffn.gated else ffn.up_proj).weight.float()
        cent = F.normalize(rows, dim=-1).view(ffn.num_experts, ffn.neurons_per_expert, -1).mean(1)
        self.fc1.weight.copy_(cent.to(self.fc1.weight.dtype))
        self.fc1.bias.zero_()


def moefication_router(hidden_size: int, num_experts: int, *, dtype=None, device=None, **_: object) -> nn.Module:
    return MoEficationRouter(hidden_size, num_experts, dtype=dtype, device=device)


def moefication_k(routing: RoutingConfig) -> int:
    k = (routing.params or {}).get("k", routing.k)
    if k is None or int(k) < 1:
        raise PrunePathError("method 'moefication' needs k >= 1 experts per token: "
                             "prunepath.configure(model, method='moefication', k=8)")
    return int(k)


def topk_method(scores: torch.Tensor, routing: RoutingConfig, layer_index: int,
                always_on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The k highest scores (ties to the lower index), plus always-on experts; unweighted."""
    k = moefication_k(routing)
    s = scores.float()
    if bool(always_on.any()):
        s = s.masked_fill(always_on, float("-inf"))  # always-on experts do not use up k
    k = min(k, s.shape[-1])
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
    mask = torch.zeros(s.shape, dtype=torch.bool, device=s.device).scatter(-1, order, True) | always_on
    return mask.to(torch.float32), mask


def moefication_targets(mass: torch.Tensor) -> torch.Tensor:
    """Each expert's share of the positive activation mass, max-normalised per token (the top expert → 1)."""
    return mass / mass.amax(-1, keepdim=True).clamp_min(1e-12)

