"""Routing losses (PAPER.md §4) against a float64 reference, and the loss registry."""

import math

import pytest
import torch

from prunepath.training.config import TrainConfig
from prunepath.training.losses import get_aux_loss, prunepath_aux_loss, register_aux_loss, routing_terms


def reference(scores, mask=None, always_on=None, offset=0.0):
    g = scores.double().reshape(-1, scores.shape[-1])
    if mask is not None:
        g = g[mask.reshape(-1)]
    gate = float(torch.sigmoid(g + offset).mean())
    if always_on is not None:
        g = g[:, ~always_on]
    ents, ps = [], []
    for row in g.tolist():
        mx = max(row)
        ex = [math.exp(v - mx) for v in row]
        z = sum(ex)
        p = [e / z for e in ex]
        ents.append(-sum(pi * math.log(pi) for pi in p if pi > 0))
        ps.append(p)
    e = len(ps[0])
    mean_p = [sum(p[j] for p in ps) / len(ps) for j in range(e)]
    return {"ent": sum(ents) / len(ents), "bal": e * sum(m * m for m in mean_p), "gate": gate}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_routing_terms_match_float64_reference(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(3, 7, 12, generator=g) * 2
    mask = torch.rand(3, 7, generator=g) > 0.3
    always_on = torch.zeros(12, dtype=torch.bool)
    always_on[[2, 5]] = True
    for m, ao, off in ((None, None, 0.0), (mask, None, 0.0), (mask, always_on, 3.0)):
        got = routing_terms(scores, m, ao, off)
        want = reference(scores, m, ao, off)
        for k in want:
            assert float(got[k]) == pytest.approx(want[k], rel=1e-5, abs=1e-6), k


def test_balance_is_one_when_uniform_and_larger_when_collapsed():
    uniform = torch.zeros(5, 8)
    assert float(routing_terms(uniform)["bal"]) == pytest.approx(1.0)
    assert float(routing_terms(uniform)["ent"]) == pytest.approx(math.log(8), rel=1e-6)
    collapsed = torch.zeros(5, 8)
    collapsed[:, 0] = 20.0
    assert float(routing_terms(collapsed)["bal"]) > 7.9
    assert float(routing_terms(collapsed)["ent"]) < 1e-3


def test_pad_tokens_do_not_count():
    scores = torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    garbage = scores.clone()
    garbage[~mask] = 1e4 * torch.randn_like(garbage[~mask])
    a, b = routing_terms(scores, mask), routing_terms(garbage, mask)
    for k in a:
        assert torch.allclose(a[k], b[k])


def test_aux_loss_weights_and_layer_average():
    cfg = TrainConfig(eta=0.5, lam=0.25, gamma=2.0)
    layers = [torch.randn(2, 5, 8, requires_grad=True) for _ in range(3)]
    out = prunepath_aux_loss(layers, None, cfg)
    with torch.no_grad():
        per = [routing_terms(s) for s in layers]
    vals = {k: float(v.detach()) for k, v in out.items()}
    assert vals["ent"] == pytest.approx(0.5 * sum(float(p["ent"]) for p in per) / 3, rel=1e-6)
    assert vals["bal"] == pytest.approx(0.25 * sum(float(p["bal"]) for p in per) / 3, rel=1e-6)
    assert vals["gate"] == pytest.approx(2.0 * sum(float(p["gate"]) for p in per) / 3, rel=1e-6)
    sum(out.values()).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in layers)
    assert "gate" not in prunepath_aux_loss(layers, None, TrainConfig(gamma=0.0))


def test_register_aux_loss_for_a_new_method():
    def fn(scores, token_mask, cfg):
        return {"zero": scores[0].sum() * 0}
    register_aux_loss("unit-test-method", fn)
    assert get_aux_loss("unit-test-method") is fn
    assert get_aux_loss("prunepath") is prunepath_aux_loss
