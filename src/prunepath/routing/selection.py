"""Expert selection rules: pure functions from routing probabilities to a boolean mask.

The paper's rule ("cumulative"): sort experts by probability (descending, ties to the lower index), keep the
rank-0 expert and every expert whose *inclusive* cumulative mass is *strictly* below τ. The expert whose mass
crosses τ is dropped — unlike nucleus sampling, which the ``"nucleus"`` rule provides.
"""

from __future__ import annotations

import torch

from prunepath.routing.config import RULES, validate_rule  # noqa: F401  (re-exported: the validation lives in config)

def _rank_order(probs: torch.Tensor) -> torch.Tensor:
    # A stable descending sort keeps equal probabilities in index order, i.e. ties go to the lower index.
    return torch.sort(probs, dim=-1, descending=True, stable=True).indices


def select_experts(
    probs: torch.Tensor,
    tau: float | torch.Tensor | None = None,
    rule: str = "cumulative",
    k: int | None = None,
) -> torch.Tensor:
    """Boolean mask of active experts, same shape as ``probs`` (the rule runs over the last dimension).

    ``tau`` may be a float or a tensor broadcastable to ``probs.shape[:-1]`` (e.g. one τ per token).
    Cumulative sums are taken in float32 whatever the input dtype.
    """
    validate_rule(rule, tau if not isinstance(tau, torch.Tensor) else 1.0, k)
    num_experts = probs.shape[-1]
    if rule == "all":
        return torch.ones_like(probs, dtype=torch.bool)
    order = _rank_order(probs)
    if rule == "topk":
        keep_sorted = torch.arange(num_experts, device=probs.device) < int(k)
        keep_sorted = keep_sorted.expand_as(probs)
    else:
        sorted_p = torch.gather(probs.float(), -1, order)
        cum = torch.cumsum(sorted_p, dim=-1)
        if rule == "nucleus":
            cum = cum - sorted_p  # exclusive: the expert that crosses τ is kept
        tau_t = torch.as_tensor(tau, dtype=torch.float32, device=probs.device)
        if tau_t.dim() > 0:
            tau_t = tau_t.unsqueeze(-1)
        keep_sorted = cum < tau_t
        keep_sorted[..., 0] = True
    mask = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device)
    return mask.scatter(-1, order, keep_sorted)


def select_experts_reference(probs: torch.Tensor, tau: float, rule: str = "cumulative", k: int | None = None) -> torch.Tensor:
    """A plain Python loop over tokens; the specification the vectorised rule is tested against."""
    flat = probs.reshape(-1, probs.shape[-1]).double().tolist()
    out = []
    for row in flat:
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))
        keep = [False] * len(row)
        cum = 0.0
        for rank, idx in enumerate(order):
            before = cum
            cum += row[idx]
            if rule == "all":
                ok = True
            elif rule == "topk":
                ok = rank < k
            elif rule == "nucleus":
                ok = rank == 0 or before < tau
            else:
                ok = rank == 0 or cum < tau
            keep[idx] = ok
        out.append(keep)
    return torch.tensor(out, dtype=torch.bool).reshape(probs.shape)
