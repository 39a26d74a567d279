import pytest
import torch

from prunepath import PrunePathError
from prunepath.conversion.clustering import (
    balanced_assign, balanced_kmeans, cluster_neurons, inertia, labels_to_permutation, resolve_expert_count)


def planted(n, d, k, noise, seed):
    g = torch.Generator().manual_seed(seed)
    truth = torch.randperm(n, generator=g) % k
    centers = torch.randn(k, d, generator=g)
    return centers[truth] + noise * torch.randn(n, d, generator=g), truth


@pytest.mark.parametrize("n,d,k", [(64, 8, 4), (1536, 64, 48), (960, 32, 30)])
def test_clusters_are_exactly_equal_sized(n, d, k):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n))
    labels = balanced_kmeans(x, k, seed=0)
    assert torch.equal(torch.bincount(labels, minlength=k), torch.full((k,), n // k))


def test_recovers_planted_equal_clusters():
    from sklearn.metrics import adjusted_rand_score

    x, truth = planted(1024, 48, 32, noise=0.5, seed=3)
    labels = balanced_kmeans(x, 32, seed=0)
    assert adjusted_rand_score(truth.numpy(), labels.numpy()) > 0.95


def test_better_than_random_partition_and_deterministic():
    x, _ = planted(768, 32, 24, noise=1.5, seed=5)
    a = balanced_kmeans(x, 24, seed=11)
    b = balanced_kmeans(x, 24, seed=11)
    assert torch.equal(a, b)
    rand = torch.randperm(768, generator=torch.Generator().manual_seed(0)) % 24
    assert inertia(x, a) < 0.8 * inertia(x, rand)


def test_balanced_assign_respects_capacity_and_prefers_best():
    scores = torch.tensor([[5.0, 0.0], [4.0, 0.0], [3.0, 2.9], [0.0, 1.0]])
    labels = balanced_assign(scores, capacity=2)
    assert labels.tolist() == [0, 0, 1, 1]
    g = torch.Generator().manual_seed(0)
    s = torch.randn(120, 6, generator=g)
    lab = balanced_assign(s, 20)
    assert torch.equal(torch.bincount(lab, minlength=6), torch.full((6,), 20))


def test_permutation_is_contiguous_blocks():
    labels = torch.tensor([2, 0, 1, 0, 2, 1])
    perm = labels_to_permutation(labels)
    assert labels[perm].tolist() == [0, 0, 1, 1, 2, 2]
    assert sorted(perm.tolist()) == list(range(6))


def test_cluster_methods():
    rows = torch.randn(64, 16)
    for method in ("kmeans", "random"):
        perm = cluster_neurons(rows, 8, method=method, seed=1)
        assert sorted(perm.tolist()) == list(range(64))
    acts = torch.randn(200, 64)
    perm = cluster_neurons(rows, 8, method="coactivation", activations=acts)
    assert sorted(perm.tolist()) == list(range(64))
    with pytest.raises(PrunePathError, match="calibration activations"):
        cluster_neurons(rows, 8, method="coactivation")
    with pytest.raises(PrunePathError, match="unknown clustering"):
        cluster_neurons(rows, 8, method="bogus")


def test_expert_count_resolution_and_errors():
    assert resolve_expert_count(1536, 32, None) == (48, 32)
    assert resolve_expert_count(1536, None, 96) == (96, 16)
    with pytest.raises(PrunePathError, match="does not divide the FFN width 1536"):
        resolve_expert_count(1536, 100, None)
    with pytest.raises(PrunePathError, match="num_experts=7"):
        resolve_expert_count(1536, None, 7)
