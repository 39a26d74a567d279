"""Dense-equivalent (GatedDense) and grouped (prefill) PrunePath FFNs against the PyTorch references."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of the kernels

import pytest
import torch

pytest.importorskip("triton")

from prunepath.kernels import pack_ffn, random_packed_ffn  # noqa: E402
from prunepath.kernels.dense import GatedDense, grouped_ffn, grouped_mm  # noqa: E402
from prunepath.kernels.ffn import SparseFFN  # noqa: E402
from prunepath.kernels.reference import ffn_reference, route_reference  # noqa: E402
from prunepath.routing.config import RoutingConfig  # noqa: E402
from kernel_numerics import rel_err as _rel  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these tests run the kernels in Triton's CPU interpreter", allow_module_level=True)


CASES = [("cumulative", 0.55, None), ("nucleus", 0.45, None), ("topk", 0.5, 4), ("all", 0.5, None),
         ("cumulative", 1.3, None)]


@pytest.mark.parametrize("gated,act,bias", [(True, "silu", False), (False, "gelu_tanh", True), (False, "relu", True)])
def test_gated_dense_matches_reference(gated, act, bias):
    gen = torch.Generator().manual_seed(11 + gated)
    e, n, d, b = 21, 12, 40, 5
    packed = random_packed_ffn(d, e, n, gated=gated, activation=act, bias=bias, dtype=torch.float32,
                               router_std=3.0, generator=gen)
    packed.always_on[torch.randperm(e, generator=gen)[:2]] = 1
    for rule, tau, k in CASES:
        x = torch.randn(b, d, generator=gen)
        routing = RoutingConfig(tau=tau, rule=rule, k=k, gate_offset=0.4)
        gd = GatedDense(packed, rule=rule, tau=tau, k=k, gate_offset=0.4, write_weights=True)
        poison = torch.randn(b, d, generator=gen)  # nonzero start: the FFN adds into it
        out = poison.clone()
        gd(x, out)
        rr = route_reference(x, packed, routing)
        assert torch.allclose(gd.weights, rr.weights, atol=1e-6), rule  # the same experts and gates
        assert _rel(out - poison, ffn_reference(x, packed, routing)) < 1e-5, rule
        assert torch.allclose(gd.select(rr.logits), rr.weights, atol=1e-6)
        if rule in ("cumulative", "nucleus") and tau < 1:
            assert 0 < int((rr.weights != 0).sum()) < b * e  # τ moves the decision


def test_gated_dense_tau_in_place_and_ties():
    # Equal logits: the rule keeps the lowest indices, as the routing kernel does; τ changes in place.
    e, d = 20, 16
    packed = random_packed_ffn(d, e, 4, dtype=torch.float32)
    packed.router_w.zero_()  # a view into the fused buffer: w_in_router sees it
    assert float(packed.w_in_router()[-e:].abs().sum()) == 0.0
    x = torch.randn(2, d)
    gd = GatedDense(packed, tau=0.5, gates=False, write_weights=True)
    for k in (1, 3, 7):
        gd.set_tau((k + 0.5) / e)
        gd.forward(x)
        expect = torch.zeros(2, e)
        expect[:, :k] = 1.0
        assert torch.equal(gd.weights, expect)


def test_gated_dense_bf16_and_sparse_modes_agree():
    gen = torch.Generator().manual_seed(5)
    e, n, d = 12, 8, 48
    packed = random_packed_ffn(d, e, n, dtype=torch.bfloat16, router_std=3.0, generator=gen)
    x = torch.randn(1, d, generator=gen).to(torch.bfloat16)
    routing = RoutingConfig(tau=0.6)
    ref = ffn_reference(x, packed, routing)
    outs = {}
    for mode in ("sparse", "dense", "dense_legacy"):
        out = torch.zeros(1, d)
        SparseFFN(packed, 1, routing, mode=mode)(x, out)
        outs[mode] = out
        assert _rel(out, ref) < 2e-2, mode
    assert _rel(outs["dense"], outs["dense_legacy"]) < 1e-2


def test_pack_ffn_fuses_router_without_copy():
    from prunepath.routing.ffn import PrunePathFFN  # noqa: F401 - the converted module type
    import prunepath
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1))
    prunepath.moefy(m, neurons_per_expert=8, progress=False, clustering="random")
    ffn = prunepath.prunepath_modules(m)[0]
    p = pack_ffn(ffn)
    cat = p.w_in_router()
    assert cat is not None and cat.shape == (p.w_in.numel() // 16 + p.num_experts, 16)
    assert cat.data_ptr() == p.w_in.data_ptr()
    assert torch.equal(cat[-p.num_experts:], ffn.router.weight)
    p.router_w = p.router_w.clone()  # no longer adjacent: the fused view is refused
    assert p.w_in_router() is None
    gd = GatedDense(p, tau=0.7)  # falls back to two GEMMs with the same result
    x = torch.randn(3, 16)
    assert _rel(gd.forward(x), ffn_reference(x, p, RoutingConfig(tau=0.7))) < 1e-5


@pytest.mark.parametrize("gated,bias", [(True, False), (False, True)])
def test_grouped_ffn_matches_reference(gated, bias):
    gen = torch.Generator().manual_seed(21 + gated)
    e, n, d, t = 9, 8, 32, 23
    packed = random_packed_ffn(d, e, n, gated=gated, activation="silu" if gated else "gelu", bias=bias,
                               dtype=torch.float32, router_std=3.0, generator=gen)
    x = torch.randn(t, d, generator=gen)
    routing = RoutingConfig(tau=0.5)
    w = route_reference(x, packed, routing).weights
    w[:, 4] = 0  # an expert nobody uses: an empty group
    y = grouped_ffn(x, packed, w, use_grouped=False)
    assert _rel(y, _weighted_dense(x, packed, w)) < 1e-5
    w2 = route_reference(x, packed, routing).weights  # with the rule's own weights it is the reference FFN
    assert _rel(grouped_ffn(x, packed, w2, use_grouped=False), ffn_reference(x, packed, routing)) < 1e-5


def _weighted_dense(x, packed, w):
    """Σ_e w[t, e] · FFN_e(x_t) + b_out in float64, every expert computed."""
    from prunepath.kernels.layout import _act_reference
    e, n = packed.num_experts, packed.neurons_per_expert
    w_in, b_in, w_out = packed.dense_weights()
    pre = x.double() @ w_in.double().t()
    if b_in is not None:
        pre = pre + b_in.double()
    pre = pre.view(x.shape[0], e, -1)
    h = (_act_reference(packed.activation, pre[..., :n]) * pre[..., n:] if packed.gated
         else _act_reference(packed.activation, pre))
    y = (h * w.double().unsqueeze(-1)).reshape(x.shape[0], -1) @ w_out.double()
    return y + packed.b_out.double() if packed.b_out is not None else y


def test_grouped_mm_torch_op_and_loop_agree():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(13, 16, generator=gen).to(torch.bfloat16)
    b = torch.randn(4, 16, 8, generator=gen).to(torch.bfloat16)
    offs = torch.tensor([3, 3, 9, 13], dtype=torch.int32)  # group 1 empty
    loop = grouped_mm(a, b, offs, use_grouped=False)
    ref = torch.cat([a[:3].float() @ b[0].float(), a[3:9].float() @ b[2].float(), a[9:].float() @ b[3].float()])
    assert _rel(loop, ref) < 1e-2
    try:
        op = torch._grouped_mm(a, b, offs=offs)
    except (RuntimeError, NotImplementedError):
        pytest.skip("torch._grouped_mm does not run on this CPU build")
    assert _rel(op, ref) < 1e-2
    assert _rel(grouped_mm(a, b, offs, use_grouped=True), ref) < 1e-2


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_k_tensor_view_drives_the_count(mode):
    # The realistic-density benchmark points every layer's k at a shared device tensor and rewrites it per step.
    gen = torch.Generator().manual_seed(9)
    e, d = 14, 24
    packed = random_packed_ffn(d, e, 4, dtype=torch.float32, router_std=2.0, generator=gen)
    ffn = SparseFFN(packed, 1, RoutingConfig(rule="topk", k=e), mode=mode)
    kcur = torch.zeros(2, dtype=torch.int32)
    ffn.k_tensor = kcur[1:2]
    if ffn.dense is not None:
        ffn.dense.write_weights = True
    x = torch.randn(1, d, generator=gen)
    for k in (3, 9):
        kcur[1] = k
        ffn(x, torch.zeros(1, d))
        got = int(ffn.router.count) if ffn.router is not None else int((ffn.dense.weights != 0).sum())
        assert got == k


@pytest.mark.parametrize("gated,act,bias", [(True, "silu", False), (False, "gelu_tanh", True), (True, "gelu", True)])
def test_plain_dense_without_router_matches_reference(gated, act, bias):
    # router=False: every expert unscaled, the router never read (NaN rows prove it), with and without thresholds
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    e, n, d, b = 9, 8, 24, 3
    packed = random_packed_ffn(d, e, n, gated=gated, activation=act, bias=bias, dtype=torch.float32, generator=gen)
    packed.router_w.fill_(float("nan"))
    routing = RoutingConfig(tau=1.05, gates=False)
    x = torch.randn(b, d, generator=gen, dtype=torch.float64).float()
    gd = GatedDense(packed, router=False)
    assert gd.rule == "all" and not gd.gates
    poison = torch.randn(b, d, generator=gen)
    out = poison.clone()
    gd(x, out)
    assert _rel(out - poison, ffn_reference(x, packed, routing, dtype=torch.float64)) < 1e-5
    t_in, t_mid = float(x.abs().median()), 0.05
    thr = torch.tensor([t_in, t_mid], dtype=torch.float32)
    out = poison.clone()
    GatedDense(packed, router=False, thresholds=thr)(x, out)
    ref = ffn_reference(x, packed, routing, dtype=torch.float64, t_in=t_in, t_mid=t_mid)
    assert _rel(out - poison, ref) < 1e-5
    assert _rel(ref, ffn_reference(x, packed, routing, dtype=torch.float64)) > 1e-3  # the thresholds matter
