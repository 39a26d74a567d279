import pytest
import torch

from prunepath import PrunePathError, select_experts
from prunepath.routing.selection import select_experts_reference


def mask_of(p, tau, rule="cumulative", k=None):
    return select_experts(torch.tensor(p), tau, rule, k).tolist()


def test_paper_examples():
    p = [0.5, 0.3, 0.2]
    assert mask_of(p, 0.7) == [True, False, False]     # 0.8 crosses 0.7: dropped (strict, inclusive)
    assert mask_of(p, 0.81) == [True, True, False]
    assert mask_of(p, 1.05) == [True, True, True]
    assert mask_of(p, 0.01) == [True, False, False]    # rank 0 always kept
    assert mask_of(p, 0.5) == [True, False, False]     # cum 0.5 is not < 0.5


def test_order_does_not_matter_and_ties_go_to_lower_index():
    assert mask_of([0.2, 0.5, 0.3], 0.81) == [False, True, True]
    assert mask_of([0.25, 0.25, 0.25, 0.25], 0.3) == [True, False, False, False]
    assert mask_of([0.1, 0.3, 0.3, 0.3], 0.65) == [False, True, True, False]
    assert mask_of([0.1, 0.3, 0.3, 0.3], 0.65, rule="nucleus") == [False, True, True, True]


def test_other_rules():
    p = [0.5, 0.3, 0.2]
    assert mask_of(p, 0.7, rule="nucleus") == [True, True, False]   # keeps the crossing expert
    assert mask_of(p, None, rule="topk", k=2) == [True, True, False]
    assert mask_of([0.1, 0.6, 0.3], None, rule="topk", k=1) == [False, True, False]
    assert mask_of(p, None, rule="all") == [True, True, True]


@pytest.mark.parametrize("rule", ["cumulative", "nucleus", "topk"])
def test_random_distributions_match_reference_loop(rule):
    g = torch.Generator().manual_seed(1234)
    for num_experts in (3, 8, 48):
        logits = torch.randn(4, 5, num_experts, generator=g) * 2
        probs = torch.softmax(logits, -1)
        for tau in (0.05, 0.3, 0.5, 0.77, 0.95, 1.05):
            k = max(1, int(tau * num_experts)) if rule == "topk" else None
            got = select_experts(probs, tau, rule, k)
            ref = select_experts_reference(probs, tau, rule, k)
            assert torch.equal(got, ref), (num_experts, tau)


def test_random_ties_match_reference():
    g = torch.Generator().manual_seed(7)
    raw = torch.randint(1, 4, (64, 6), generator=g).float()  # many exact ties
    probs = raw / raw.sum(-1, keepdim=True)
    for tau in (0.2, 0.4, 0.6, 0.9):
        assert torch.equal(select_experts(probs, tau), select_experts_reference(probs, tau))


def test_bf16_and_per_token_tau():
    probs = torch.softmax(torch.randn(10, 16), -1)
    m32 = select_experts(probs, 0.6)
    mbf = select_experts(probs.bfloat16(), 0.6)
    assert mbf.dtype == torch.bool and mbf.shape == probs.shape
    # A per-token τ tensor equals looping over scalar τ.
    taus = torch.linspace(0.1, 1.0, 10)
    per_token = select_experts(probs, taus)
    for i, t in enumerate(taus.tolist()):
        assert torch.equal(per_token[i], select_experts(probs[i], t))
    assert m32.sum() >= 10


def test_monotone_in_tau():
    probs = torch.softmax(torch.randn(200, 32), -1)
    counts = [int(select_experts(probs, t).sum()) for t in (0.1, 0.3, 0.5, 0.7, 0.9, 1.05)]
    assert counts == sorted(counts) and counts[-1] == 200 * 32


@pytest.mark.parametrize("tau", [0.0, -0.5])
def test_bad_tau(tau):
    with pytest.raises(PrunePathError, match="tau must be > 0"):
        select_experts(torch.tensor([0.5, 0.5]), tau)


def test_bad_rule_and_k():
    with pytest.raises(PrunePathError, match="unknown routing rule"):
        select_experts(torch.tensor([0.5, 0.5]), 0.5, rule="bogus")
    with pytest.raises(PrunePathError, match="k >= 1"):
        select_experts(torch.tensor([0.5, 0.5]), None, rule="topk", k=0)
