"""Expert granularity: every decode kernel path at N = 8, 16, 32, 64 neurons per expert (E = FFN / N, never a
power of two here), batch 1 and 8, with the kernels' *default* tile sizes (the ones the GPU runs), under
TRITON_INTERPRET=1 against the PyTorch references. Tiny hidden sizes keep the interpreter fast."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of the kernels

import pytest
import torch

pytest.importorskip("triton")

import prunepath  # noqa: E402
from prunepath.kernels import random_packed_ffn  # noqa: E402
from prunepath.kernels.dense import GatedDense  # noqa: E402
from prunepath.kernels.experts import ExpertRunner  # noqa: E402
from prunepath.kernels.ffn import SparseFFN  # noqa: E402
from prunepath.kernels.reference import experts_reference, ffn_reference, route_reference  # noqa: E402
from prunepath.kernels.route import Router  # noqa: E402
from prunepath.routing.config import RoutingConfig  # noqa: E402
from kernel_numerics import rel_err as _rel  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these tests run the kernels in Triton's CPU interpreter", allow_module_level=True)

FF = 192  # a tiny FFN width: E = 24, 12, 6, 3 (like SmolLM2's 1536 = 192/96/48/24 experts, none a power of two)
SIZES = [8, 16, 32, 64]
D = 40  # hidden: not a power of two (SmolLM2's 576 is not either)


def _safe_tau(x: torch.Tensor, packed, lo: float, hi: float, gen: torch.Generator) -> float:
    """A τ far (> 1e-4) from every token's cumulative sums, so summation order cannot flip a decision."""
    p = torch.softmax(x.double() @ packed.router_w.double().t(), -1)
    cums = torch.sort(p, -1, descending=True).values.cumsum(-1)
    for _ in range(500):
        tau = lo + (hi - lo) * float(torch.rand(1, generator=gen))
        if float((cums - tau).abs().min()) > 1e-4:
            return tau
    raise AssertionError("no safe tau found")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("batch", [1, 8])
def test_every_ffn_path_at_expert_size(n, batch):
    e = FF // n
    gen = torch.Generator().manual_seed(100 * n + batch)
    packed = random_packed_ffn(D, e, n, dtype=torch.float32, router_std=3.0, generator=gen)
    x = torch.randn(batch, D, generator=gen)
    tau = _safe_tau(x, packed, 0.3, 0.8, gen)
    routing = RoutingConfig(tau=tau, gate_offset=0.3)
    ref_route = route_reference(x, packed, routing)
    c = int(ref_route.count)
    assert 0 < c <= e and int(ref_route.mask.sum()) < batch * e  # τ really drops experts

    # Routing kernel (default tiles: E_PAD = next power of two ≥ E, masked).
    router = Router(packed, batch, tau=tau, gate_offset=0.3)
    router.ids.fill_(-7)
    router(x)
    assert int(router.count) == c
    assert torch.equal(router.ids[:c], ref_route.ids[:c])
    assert torch.equal(router.keep.bool(), ref_route.mask)
    assert torch.allclose(router.weights, ref_route.weights, atol=1e-6)
    assert torch.allclose(router.slot_w[:c], ref_route.slot_w[:c], atol=1e-6)

    # Expert kernels alone on the reference routing (default tiles), adding into a poisoned output.
    runner = ExpertRunner(packed, batch)
    poison = torch.randn(batch, D, generator=gen)
    out = poison.clone()
    runner.run(x, ref_route.ids, ref_route.slot_w, ref_route.count, out)
    want = experts_reference(x, packed, ref_route.ids, ref_route.slot_w, ref_route.count, dtype=torch.float64)
    assert _rel(out - poison, want) < 1e-5

    # The layer paths the decode engine runs (routing + experts, dense-equivalent) vs the dense reference.
    ref = ffn_reference(x, packed, routing)
    for mode in ("sparse", "dense"):
        out = poison.clone()
        SparseFFN(packed, batch, routing, mode=mode)(x, out)
        assert _rel(out - poison, ref) < 1e-5, mode
    gd = GatedDense(packed, tau=tau, gate_offset=0.3, write_weights=True)
    gd.forward(x)
    assert torch.allclose(gd.weights, ref_route.weights, atol=1e-6)


@pytest.mark.parametrize("n", SIZES)
def test_plain_ffn_with_biases_at_expert_size(n):
    # GPT-2-like experts (ungated GELU, biases): R = n, so at n = 8 the in-kernel's rows (8) are below its
    # 16-row tile and masked.
    e = FF // n
    gen = torch.Generator().manual_seed(7 * n)
    packed = random_packed_ffn(D, e, n, gated=False, activation="gelu_tanh", bias=True, dtype=torch.float32,
                               router_std=3.0, generator=gen)
    for batch in (1, 8):
        x = torch.randn(batch, D, generator=gen)
        routing = RoutingConfig(tau=_safe_tau(x, packed, 0.3, 0.8, gen))
        out = torch.zeros(batch, D)
        SparseFFN(packed, batch, routing)(x, out)
        assert _rel(out, ffn_reference(x, packed, routing)) < 1e-5


@pytest.mark.parametrize("n", SIZES)
def test_decode_engine_at_expert_size(n):
    # The engine's decode step through the sparse kernels against HF greedy decoding of the same converted model
    # (batch 1; the batch-8 and dense-equivalent layer paths are covered above, and the engine's batching does
    # not depend on N).
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunepath.decoding.engine import DecodeEngine
    torch.manual_seed(n)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=FF, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    model.eval()
    prunepath.moefy(model, neurons_per_expert=n, progress=False, clustering="random")
    (ffn,) = prunepath.prunepath_modules(model)
    assert ffn.num_experts == FF // n
    torch.nn.init.normal_(ffn.router.weight, std=1.0)
    prunepath.configure(model, tau=0.6)
    for batch, mode in ((1, "sparse"),):
        ids = torch.randint(0, 64, (batch, 4), generator=torch.Generator().manual_seed(n + batch))
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                              pad_token_id=0)[:, 4:]
        eng = DecodeEngine(model, batch=batch, max_len=7, device="cpu", ffn=mode)
        assert eng.ffn_mode == mode
        assert torch.equal(eng.generate(ids, 2), want), (batch, mode)
