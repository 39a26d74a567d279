"""Grouping FFN neurons into equal-size experts.

``balanced_kmeans`` is k-means on L2-normalised neuron vectors with an exact equal-size constraint. The
assignment step is a vectorised capacity-constrained greedy (each round, every unassigned point proposes to its
best cluster that still has room; each cluster accepts its best proposers up to its remaining capacity), which
scales to 7B-class layers (14,336 neurons × 4,096 dims into 448 clusters) where min-cost-flow solvers such as
``k-means-constrained`` take minutes.
"""

from __future__ import annotations

import torch

from prunepath.errors import PrunePathError


def resolve_expert_count(intermediate_size: int, neurons_per_expert: int | None, num_experts: int | None) -> tuple[int, int]:
    """(num_experts, neurons_per_expert) for a d_ff, with a clear error when they do not divide it."""
    if num_experts is not None:
        if num_experts < 1 or intermediate_size % num_experts:
            divisors = [e for e in (8, 16, 32, 48, 64, 96, 128, 192, 256, 448) if intermediate_size % e == 0]
            raise PrunePathError(
                f"num_experts={num_experts} does not divide the FFN width {intermediate_size}; "
                f"pick a divisor (e.g. {divisors[:6]})")
        return num_experts, intermediate_size // num_experts
    n = 32 if neurons_per_expert is None else int(neurons_per_expert)
    if n < 1 or intermediate_size % n:
        divisors = [k for k in (8, 16, 24, 32, 48, 64, 96, 128, 256) if intermediate_size % k == 0]
        raise PrunePathError(
            f"neurons_per_expert={n} does not divide the FFN width {intermediate_size}; "
            f"pick a divisor such as {divisors} or pass num_experts")
    return intermediate_size // n, n


def balanced_assign(scores: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each row to a column, exactly ``capacity`` rows per column, greedily maximising ``scores``.

    ``scores`` is [N, K] with N == K * capacity. Deterministic (ties go to the lower index).
    """
    n, k = scores.shape
    if n != k * capacity:
        raise PrunePathError(f"balanced_assign needs N == K * capacity (got {n} != {k} * {capacity})")
    labels = torch.full((n,), -1, dtype=torch.long)
    remaining = torch.full((k,), capacity, dtype=torch.long)
    unassigned = torch.arange(n)
    neg_inf = torch.finfo(scores.dtype).min
    while unassigned.numel():
        s = scores[unassigned]
        s = s.masked_fill((remaining == 0).unsqueeze(0), neg_inf)
        best_score, best = s.max(dim=1)
        # Group proposals by cluster, best score first; a stable sort keeps the lower row index first on ties.
        order = torch.sort(best_score, descending=True, stable=True).indices
        order = order[torch.sort(best[order], stable=True).indices]
        grouped = best[order]
        counts = torch.bincount(grouped, minlength=k)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel()) - starts[grouped]
        accept = rank < remaining[grouped]
        winners = order[accept]
        labels[unassigned[winners]] = best[winners]
        remaining -= torch.bincount(best[winners], minlength=k)
        keep = torch.ones(unassigned.numel(), dtype=torch.bool)
        keep[winners] = False
        unassigned = unassigned[keep]
    return labels


def balanced_kmeans(
    vectors: torch.Tensor,
    num_clusters: int,
    *,
    seed: int = 0,
    max_iter: int = 30,
    normalize: bool = True,
) -> torch.Tensor:
    """Equal-size k-means labels ([N] long, each label used exactly N / num_clusters times).

    Rows are L2-normalised first (the paper clusters normalised W_gate / W_1 rows). Deterministic for a seed.
    """
    x = vectors.detach().to(torch.float32).cpu()
    n = x.shape[0]
    if n % num_clusters:
        raise PrunePathError(f"{n} vectors cannot form {num_clusters} equal clusters")
    capacity = n // num_clusters
    if num_clusters == 1:
        return torch.zeros(n, dtype=torch.long)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=gen)[:num_clusters]].clone()
    labels = None
    for _ in range(max_iter):
        # argmin ||x - c||² == argmax (2 x·c - ||c||²)
        scores = 2.0 * (x @ centroids.T) - (centroids * centroids).sum(1)
        new_labels = balanced_assign(scores, capacity)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        centroids = torch.zeros_like(centroids).index_add_(0, labels, x) / capacity
    return labels


def inertia(vectors: torch.Tensor, labels: torch.Tensor, normalize: bool = True) -> float:
    """Sum of squared distances of each (normalised) vector to its cluster mean."""
    x = vectors.detach().to(torch.float64)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    k = int(labels.max()) + 1
    counts = torch.bincount(labels, minlength=k).clamp(min=1).unsqueeze(1).to(x.dtype)
    centroids = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, labels, x) / counts
    return float(((x - centroids[labels]) ** 2).sum())


def labels_to_permutation(labels: torch.Tensor) -> torch.Tensor:
    """Neuron order that makes each cluster one contiguous block (cluster 0 first, original order within)."""
    return torch.sort(labels, stable=True).indices


def cluster_neurons(
    rows: torch.Tensor,
    num_experts: int,
    *,
    method: str = "kmeans",
    seed: int = 0,
    activations: torch.Tensor | None = None,
) -> torch.Tensor:
    """Permutation of the d_ff neurons into ``num_experts`` contiguous equal blocks.

    method "kmeans": balanced k-means of the normalised rows (the paper). "random": a seeded random split
    (an ablation). "coactivation": MoEfication's split by co-activation, clustering each neuron's activation
    pattern over calibration tokens (``activations`` is [tokens, d_ff]).
    """
    n = rows.shape[0]
    if method == "kmeans":
        labels = balanced_kmeans(rows, num_experts, seed=seed)
    elif method == "random":
        gen = torch.Generator().manual_seed(seed)
        return torch.randperm(n, generator=gen)
    elif method == "coactivation":
        if activations is None:
            raise PrunePathError("method 'coactivation' needs calibration activations ([tokens, d_ff])")
        pattern = (activations.detach().float() > 0).float().T  # [d_ff, tokens]: which tokens fire each neuron
        labels = balanced_kmeans(pattern, num_experts, seed=seed)
    else:
        raise PrunePathError(f"unknown clustering method {method!r}; choose kmeans, coactivation or random")
    return labels_to_permutation(labels)
