"""The PrunePath FFN against a float64 loop over experts (the definition in PAPER.md §3)."""

import pytest
import torch
from torch import nn

import prunepath
from prunepath.routing.config import RoutingConfig
from prunepath.routing.ffn import PrunePathFFN
from prunepath.routing.selection import select_experts_reference


def make_ffn(gated, bias, routing, seed=0, E=6, n=4, d=10, act=None):
    torch.manual_seed(seed)
    ffn = PrunePathFFN(d, E, n, gated=gated, activation=act or (nn.SiLU() if gated else nn.GELU()),
                       bias_in=bias, bias_out=bias, routing=routing)
    with torch.no_grad():
        for p in ffn.parameters():
            p.normal_(0, 0.5)
    return ffn


def reference(ffn: PrunePathFFN, x: torch.Tensor) -> torch.Tensor:
    """y = Σ_{e ∈ A} g_e · FFN_e(x) + b_down, token by token, expert by expert, in float64."""
    r = ffn.routing
    xs = x.reshape(-1, x.shape[-1]).double()
    W = {k: v.double() for k, v in ffn.state_dict().items()}
    act = ffn.act_fn
    out = []
    for t in range(xs.shape[0]):
        xt = xs[t]
        logits = W["router.weight"] @ xt
        sel_logits = logits.masked_fill(ffn.always_on, float("-inf"))
        probs = torch.softmax(sel_logits, -1)
        tau = r.tau_for(ffn.layer_index)
        if r.rule == "all" or tau > 1:
            active = torch.ones(ffn.num_experts, dtype=torch.bool)
        else:
            active = select_experts_reference(probs.unsqueeze(0), tau, r.rule, r.k)[0] | ffn.always_on
        y = W["down_proj.bias"].clone() if "down_proj.bias" in W else torch.zeros(ffn.hidden_size, dtype=torch.float64)
        for e in range(ffn.num_experts):
            if not active[e]:
                continue
            sl = slice(e * ffn.neurons_per_expert, (e + 1) * ffn.neurons_per_expert)
            up = W["up_proj.weight"][sl] @ xt + (W["up_proj.bias"][sl] if "up_proj.bias" in W else 0)
            if ffn.gated:
                gate = W["gate_proj.weight"][sl] @ xt + (W["gate_proj.bias"][sl] if "gate_proj.bias" in W else 0)
                h = act(gate) * up
            else:
                h = act(up)
            g = torch.sigmoid(logits[e] + r.gate_offset) if r.gates else 1.0
            y = y + g * (W["down_proj.weight"][:, sl] @ h)
        out.append(y)
    return torch.stack(out).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("gated,bias", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("settings", [
    dict(tau=0.5), dict(tau=0.8, gate_offset=3.0), dict(tau=0.6, rule="nucleus"), dict(rule="topk", k=2, tau=1.0),
    dict(tau=1.05), dict(rule="all", gates=False), dict(tau=0.3, gates=False),
])
def test_matches_float64_reference(gated, bias, settings):
    ffn = make_ffn(gated, bias, RoutingConfig(**settings), seed=hash((gated, bias)) % 1000)
    x = torch.randn(3, 5, 10)
    with torch.no_grad():
        got = ffn(x)
    torch.testing.assert_close(got.double(), reference(ffn, x), atol=1e-5, rtol=1e-5)
    assert ffn.last_active.shape == (3, 5)


def test_always_on_experts_do_not_consume_budget():
    ffn = make_ffn(True, False, RoutingConfig(tau=0.2))
    ffn.always_on[[0, 3]] = True
    x = torch.randn(7, 10)
    with torch.no_grad():
        got = ffn(x)
    torch.testing.assert_close(got.double(), reference(ffn, x), atol=1e-5, rtol=1e-5)
    assert bool((ffn.last_active >= 3).all())  # both always-on experts + at least the rank-0 expert


def test_layer_tau_overrides():
    ffn = make_ffn(False, True, RoutingConfig(tau=0.2, layer_tau={0: 1.5}))
    with torch.no_grad():
        ffn(torch.randn(4, 10))
    assert bool((ffn.last_active == ffn.num_experts).all())


def test_bf16_runs_and_is_close():
    ffn = make_ffn(True, False, RoutingConfig(tau=0.9))
    x = torch.randn(2, 4, 10)
    with torch.no_grad():
        ref = ffn(x)
        ffn_bf = ffn.to(torch.bfloat16)
        got = ffn_bf(x.bfloat16())
    assert got.dtype == torch.bfloat16
    # bf16 has ~3 significant digits; expert selection may flip on near-ties, so compare loosely.
    assert (got.float() - ref).abs().mean() < 0.05 * ref.abs().mean() + 1e-3


def test_zero_router_starts_at_half_gates():
    torch.manual_seed(0)
    ffn = PrunePathFFN(8, 4, 2, gated=True, activation=nn.SiLU(), routing=RoutingConfig(tau=1.05))
    assert float(ffn.router.weight.detach().abs().sum()) == 0.0
    w, mask = ffn.expert_weights(torch.randn(3, 8))
    assert bool(mask.all()) and torch.allclose(w, torch.full_like(w, 0.5))


@pytest.mark.parametrize("n,d,dtype", [(16, 64, torch.float32), (4, 10, torch.bfloat16), (8, 8, torch.float32)])
def test_expert_output_norms_match_the_dense_product_in_float64(n, d, dtype):
    # the Gram form sqrt(hᵀ WᵀW h) against ‖h W‖ computed directly; expert 0 writes nothing (a norm of 0, not NaN)
    ffn = make_ffn(True, False, RoutingConfig(), seed=3, E=5, n=n, d=d)
    with torch.no_grad():
        ffn.down_proj.weight[:, :n] = 0
    h = torch.randn(3, 7, 5 * n, generator=torch.Generator().manual_seed(11)).to(dtype)
    got = ffn._norms_of_intermediate(h, chunk=4)
    w = ffn.down_proj.weight.double()
    hd = h.double().reshape(-1, 5 * n)
    want = torch.stack([(hd[:, i * n:(i + 1) * n] @ w[:, i * n:(i + 1) * n].T).norm(dim=-1) for i in range(5)], -1)
    assert got.dtype == torch.float32 and got.shape == (21, 5)
    assert torch.isfinite(got).all() and (got[:, 0] == 0).all()
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5)
