"""Decode kernels (Triton, run under TRITON_INTERPRET=1 on the CPU) against their PyTorch references."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of the kernels

import math

import pytest
import torch

pytest.importorskip("triton")

from prunepath.errors import PrunePathError  # noqa: E402
from prunepath.kernels import pack_ffn, random_packed_ffn  # noqa: E402
from prunepath.kernels.experts import ExpertRunner  # noqa: E402
from prunepath.kernels.ffn import SparseFFN, dense_ffn  # noqa: E402
from prunepath.kernels.reference import (  # noqa: E402
    decode_attention_reference, experts_reference, ffn_reference, rmsnorm_reference, rope_reference,
    route_reference)
from prunepath.kernels.route import Router  # noqa: E402
from prunepath.routing.config import RoutingConfig  # noqa: E402
from kernel_numerics import rel_err as _rel  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these tests run the kernels in Triton's CPU interpreter", allow_module_level=True)


def _safe_tau(x: torch.Tensor, packed, lo: float, hi: float, gen: torch.Generator) -> float:
    """A τ whose distance to every token's cumulative sums exceeds fp32 rounding (so the kernel and the
    reference cannot disagree by summation order)."""
    logits = x.double() @ packed.router_w.double().t()
    ao = packed.always_on.bool()
    p = torch.softmax(logits.masked_fill(ao, float("-inf")), -1)
    cums = torch.sort(p, -1, descending=True).values.cumsum(-1)
    for _ in range(200):
        tau = lo + (hi - lo) * float(torch.rand(1, generator=gen))
        if float((cums - tau).abs().min()) > 1e-4 and float((cums - cums.diff(prepend=torch.zeros_like(cums[..., :1])) - tau).abs().min()) > 1e-4:
            return tau
    raise AssertionError("no safe tau found")


@pytest.mark.parametrize("rule", ["cumulative", "nucleus", "topk", "all"])
@pytest.mark.parametrize("batch", [1, 3])
def test_route_kernel_matches_core_rule(rule, batch):
    gen = torch.Generator().manual_seed(hash((rule, batch)) % 2**31)
    e, d = 21, 40  # neither a power of two
    packed = random_packed_ffn(d, e, 4, dtype=torch.float32, router_std=3.0, generator=gen)
    packed.always_on[torch.randperm(e, generator=gen)[:2]] = 1
    x = torch.randn(batch, d, generator=gen)
    tau = _safe_tau(x, packed, 0.3, 0.9, gen)
    routing = RoutingConfig(tau=tau, rule=rule, k=5 if rule == "topk" else None,
                            gates=(batch == 1), gate_offset=0.7)
    router = Router(packed, batch, rule=rule, tau=tau, k=routing.k, gates=routing.gates, gate_offset=0.7)
    router.ids.fill_(-7)
    router(x)
    ref = route_reference(x, packed, routing)
    c = int(ref.count)
    assert int(router.count) == c
    assert torch.equal(router.ids[:c], ref.ids[:c])
    assert torch.allclose(router.slot_w[:c], ref.slot_w[:c], atol=1e-6)
    assert torch.equal(router.keep.bool(), ref.mask)
    assert torch.allclose(router.weights, ref.weights, atol=1e-6)
    assert torch.allclose(router.logits, ref.logits, atol=1e-5, rtol=1e-5)
    if rule in ("cumulative", "nucleus"):  # the τ knob must move the decision
        assert ref.mask.sum() < batch * e


def test_route_ties_go_to_lower_index():
    # Equal logits: the cumulative rule must keep the lowest indices (uniform p = 1/E, τ = (k + ½)/E → k kept).
    e, d = 20, 16
    packed = random_packed_ffn(d, e, 4, dtype=torch.float32)
    packed.router_w.zero_()
    packed.router_w[[3, 11], 0] = 1.0  # two experts above the rest
    x = torch.zeros(1, d)
    x[0, 0] = 0.5
    for k in (1, 2, 5, 9):
        routing = RoutingConfig(tau=(k + 0.5) / e * 0.9)
        router = Router(packed, 1, tau=routing.tau)
        router(x)
        ref = route_reference(x, packed, routing)
        c = int(ref.count)
        assert int(router.count) == c and torch.equal(router.ids[:c], ref.ids[:c])


def test_route_tau_change_in_place_and_all_experts_above_one():
    gen = torch.Generator().manual_seed(1)
    packed = random_packed_ffn(24, 16, 4, dtype=torch.float32, router_std=2.0, generator=gen)
    x = torch.randn(1, 24, generator=gen)
    router = Router(packed, 1, tau=1.05)
    router(x)
    assert int(router.count) == 16
    tau = _safe_tau(x, packed, 0.2, 0.6, gen)
    router.set_tau(tau)
    router(x)
    ref = route_reference(x, packed, RoutingConfig(tau=tau))
    assert int(router.count) == int(ref.count) < 16
    assert int(router.ticket) == 0  # reset for the next launch


@pytest.mark.parametrize("gated,act,bias", [(True, "silu", False), (True, "gelu_tanh", True), (False, "gelu_tanh", True),
                                            (False, "relu", True), (False, "gelu", False), (True, "relu", False)])
@pytest.mark.parametrize("batch", [1, 3])
def test_expert_kernels_match_reference_fp32(gated, act, bias, batch):
    gen = torch.Generator().manual_seed(hash((gated, act, bias, batch)) % 2**31)
    e, n, d = 9, 12, 40  # n and d not multiples of the blocks
    packed = random_packed_ffn(d, e, n, gated=gated, activation=act, bias=bias, dtype=torch.float32, generator=gen)
    x = torch.randn(batch, d, generator=gen)
    # A random union of experts with per-token weights (0 = token did not pick it).
    c = 5
    ids = torch.zeros(e, dtype=torch.int32)
    ids[:c] = torch.randperm(e, generator=gen)[:c].to(torch.int32)
    slot_w = torch.rand(e, batch, generator=gen) * (torch.rand(e, batch, generator=gen) > 0.3)
    count = torch.tensor([c], dtype=torch.int32)
    runner = ExpertRunner(packed, batch, block_k=16, block_d=16, block_j=8, group=2, programs_per_sm=1)
    poison = torch.randn(batch, d, generator=gen)  # the kernels add into out: every element must move by ref
    out = poison.clone()
    runner.run(x, ids, slot_w, count, out)
    ref = experts_reference(x, packed, ids, slot_w, count, dtype=torch.float64)
    assert _rel(out - poison, ref) < 1e-5


@pytest.mark.parametrize("batch", [1, 2])
def test_sparse_ffn_bf16_end_to_end(batch):
    gen = torch.Generator().manual_seed(7 + batch)
    e, n, d = 12, 8, 48
    packed = random_packed_ffn(d, e, n, dtype=torch.bfloat16, router_std=3.0, generator=gen)
    x = torch.randn(batch, d, generator=gen).to(torch.bfloat16)
    tau = _safe_tau(x.float(), packed, 0.4, 0.8, gen)
    routing = RoutingConfig(tau=tau)
    ffn = SparseFFN(packed, batch, routing)
    out = torch.zeros(batch, d)
    ffn(x, out)
    ref = ffn_reference(x, packed, routing)
    assert _rel(out, ref) < 1e-2  # bf16 weights/inputs: METHOD.md's bf16 band
    assert int(ffn.router.count) < e
    dense = SparseFFN(packed, batch, routing, mode="dense")
    out2 = torch.zeros(batch, d)
    dense(x, out2)
    assert _rel(out2, ref) < 2e-2


def test_dense_ffn_is_all_experts_reference():
    gen = torch.Generator().manual_seed(3)
    packed = random_packed_ffn(20, 5, 6, gated=False, activation="gelu", bias=True, dtype=torch.float32, generator=gen)
    x = torch.randn(4, 20, generator=gen)
    routing = RoutingConfig(tau=1.05, gates=False)
    assert _rel(dense_ffn(x, packed), ffn_reference(x, packed, routing)) < 1e-5


def test_norm_kernel():
    from prunepath.kernels.decode_ops import norm
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 50, generator=gen) * 3
    w, b = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    for rms, bias, off in [(True, None, 0.0), (False, b, 0.0), (True, None, 1.0)]:
        y = norm(x, w, bias, 1e-5, rms=rms, offset=off, out_dtype=torch.float32)
        assert _rel(y, rmsnorm_reference(x, w, bias, 1e-5, rms, off)) < 1e-5


def test_rope_cache_and_decode_attention():
    from prunepath.kernels.decode_ops import DecodeAttention, rope_and_cache
    gen = torch.Generator().manual_seed(5)
    b, h, kvh, hd, t = 2, 4, 2, 16, 40
    pos = torch.tensor([29], dtype=torch.int32)
    qkv = torch.randn(b, (h + 2 * kvh) * hd, generator=gen)
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.outer(torch.arange(t).float(), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    kc = torch.randn(b, kvh, t, hd, generator=gen)
    vc = torch.randn(b, kvh, t, hd, generator=gen)
    q = torch.empty(b, h, hd)
    rope_and_cache(qkv, cos, sin, pos, q, kc, vc, h, kvh)
    parts = qkv.view(b, h + 2 * kvh, hd)

    def rot(z):
        return rope_reference(z, cos[29], sin[29])

    assert torch.allclose(q, rot(parts[:, :h]), atol=1e-5)
    assert torch.allclose(kc[:, :, 29], rot(parts[:, h:h + kvh]), atol=1e-5)
    assert torch.allclose(vc[:, :, 29], parts[:, h + kvh:], atol=1e-6)
    attn = DecodeAttention(b, h, kvh, hd, t, torch.device("cpu"), chunk=16, block_t=8)
    out = torch.full((b, h, hd), float("nan"))
    attn(q, kc, vc, pos, out)
    ref = decode_attention_reference(q, kc, vc, 30, 1 / math.sqrt(hd))
    assert _rel(out, ref) < 1e-5


def test_pack_ffn_reproduces_converted_modules():
    import prunepath
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    models = [
        LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2)),
        GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=4, n_positions=32)),
    ]
    for model, act in zip(models, ["silu", "gelu_tanh"]):
        model.eval()
        prunepath.moefy(model, neurons_per_expert=8, progress=False, clustering="random")
        ffn = prunepath.prunepath_modules(model)[0]
        torch.nn.init.normal_(ffn.router.weight, std=0.5)
        prunepath.configure(model, tau=0.7)
        packed = pack_ffn(ffn)
        assert packed.activation == act and packed.w_in.shape[0] == ffn.num_experts
        x = torch.randn(5, 32)
        with torch.no_grad():
            want = ffn(x)
        assert _rel(ffn_reference(x, packed, ffn.routing), want) < 1e-5


def test_route_every_expert_always_on_and_bad_inputs():
    gen = torch.Generator().manual_seed(9)
    packed = random_packed_ffn(16, 6, 4, dtype=torch.float32, generator=gen)
    packed.always_on.fill_(1)
    x = torch.randn(1, 16, generator=gen)
    router = Router(packed, 1, tau=0.3)
    router(x)
    ref = route_reference(x, packed, RoutingConfig(tau=0.3))
    assert int(router.count) == 6 == int(ref.count)
    assert torch.allclose(router.slot_w[:6], ref.slot_w[:6])
    with pytest.raises(PrunePathError, match="router expects"):
        router(torch.randn(2, 16))
    with pytest.raises(PrunePathError, match="unknown routing rule"):
        Router(packed, 1, rule="bogus")


def test_pack_ffn_and_activation_errors():
    from prunepath.kernels import detect_activation
    assert detect_activation(torch.nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert detect_activation(torch.nn.GELU()) == "gelu"
    assert detect_activation(torch.nn.SiLU()) == "silu"
    assert detect_activation(torch.nn.ReLU()) == "relu"
    with pytest.raises(PrunePathError, match="--kernels torch"):
        detect_activation(torch.nn.Tanh())
    with pytest.raises(PrunePathError, match="moefy"):
        pack_ffn(torch.nn.Linear(4, 4))


def test_kernels_refuse_cpu_without_interpreter(monkeypatch):
    from prunepath.kernels import check_kernel_device
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(PrunePathError, match="--device cuda"):
        check_kernel_device(torch.zeros(1))
