"""Activation-threshold FFN kernels (TRITON_INTERPRET=1 on the CPU) against the float64 masked reference."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of the kernels

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from prunepath.errors import PrunePathError  # noqa: E402
from prunepath.kernels import random_packed_ffn  # noqa: E402
from prunepath.kernels.ffn import dense_ffn  # noqa: E402
from prunepath.kernels.layout import _act_reference  # noqa: E402
from prunepath.kernels.reference import threshold_ffn_reference  # noqa: E402
from prunepath.kernels.thresholds import OFF, ThresholdFFN, _round, thresholds_tensor  # noqa: E402
from kernel_numerics import gap_threshold, rel_err as _rel  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these tests run the kernels in Triton's CPU interpreter", allow_module_level=True)


def _intermediate(x: torch.Tensor, packed, t_in: float | None) -> torch.Tensor:
    e, n = packed.num_experts, packed.neurons_per_expert
    w_in, b_in, _ = packed.dense_weights()
    xw = x.double()
    if t_in is not None:
        xw = xw.masked_fill(xw.abs() <= t_in, 0)
    pre = xw @ w_in.double().t() + (b_in.double() if b_in is not None else 0)
    pre = pre.view(x.shape[0], e, -1)
    a = packed.activation
    h = _act_reference(a, pre[..., :n]) * pre[..., n:] if packed.gated else _act_reference(a, pre)
    return h.reshape(x.shape[0], e * n)


@pytest.mark.parametrize("gated,activation,bias", [(True, "silu", False), (True, "gelu_tanh", True),
                                                    (False, "gelu", True), (False, "relu", False)])
@pytest.mark.parametrize("batch", [1, 3])
def test_threshold_ffn_matches_float64_reference(gated, activation, bias, batch):
    gen = torch.Generator().manual_seed(hash((gated, activation, bias, batch)) % 2**31)
    d, e, n = 40, 5, 6  # no power of two: every block is masked at its edge
    packed = random_packed_ffn(d, e, n, gated=gated, activation=activation, bias=bias, dtype=torch.float32,
                               generator=gen)
    x = torch.randn(batch, d, generator=gen)
    q_in, q_mid = [0.2, 0.4, 0.6][int(torch.randint(3, (1,), generator=gen))], 0.5
    t_in = gap_threshold(x, q_in)
    t_mid = gap_threshold(_intermediate(x, packed, t_in), q_mid)
    # several row blocks per program, the last one partial (the K and neuron loops), and one block per program
    chunks = {"k_chunk": 32, "j_chunk": 16} if batch == 1 else {}
    ffn = ThresholdFFN(packed, batch, thresholds_tensor(t_in, t_mid, "cpu"), block_k=16, block_m=32, block_j=8,
                       block_d=16, **chunks)
    out = torch.randn(batch, d, generator=gen)  # the kernel adds into the residual
    res0 = out.clone()
    ffn(x, out)
    ref = threshold_ffn_reference(x, packed, t_in, t_mid)
    assert _rel(out - res0, ref) < 1e-5
    # the thresholds really drop something: the unmasked FFN differs
    assert _rel(ref, threshold_ffn_reference(x, packed, None, None)) > 1e-3


def test_dropped_rows_are_never_used():
    """NaN in the gate|up rows of dropped input entries and in the W_down rows of dropped neurons: a kernel
    that read them would return NaN (their activations are not zeroed before the product)."""
    gen = torch.Generator().manual_seed(7)
    d, e, n = 48, 4, 8
    packed = random_packed_ffn(d, e, n, dtype=torch.float32, generator=gen)
    x = torch.randn(1, d, generator=gen)
    t_in = gap_threshold(x, 0.5)
    h = _intermediate(x, packed, t_in)
    t_mid = gap_threshold(h, 0.5)
    ref = threshold_ffn_reference(x, packed, t_in, t_mid)
    ffn = ThresholdFFN(packed, 1, thresholds_tensor(t_in, t_mid, "cpu"), block_k=16, block_m=32, block_j=8,
                       k_chunk=32, j_chunk=16)
    ffn.w_in_t[x[0].abs() <= t_in] = float("nan")
    packed.w_out.view(e * n, d)[h[0].abs() <= t_mid] = float("nan")
    out = torch.zeros(1, d)
    ffn(x, out)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-5


def test_off_thresholds_give_the_dense_ffn_and_set_changes_them_in_place():
    gen = torch.Generator().manual_seed(3)
    packed = random_packed_ffn(32, 4, 8, dtype=torch.float32, generator=gen)
    x = torch.randn(2, 32, generator=gen)
    th = thresholds_tensor(None, None, "cpu")
    assert th.tolist() == [OFF, OFF]
    ffn = ThresholdFFN(packed, 2, th)
    out = torch.zeros(2, 32)
    ffn(x, out)
    assert _rel(out, dense_ffn(x, packed)) < 1e-5
    t_in = gap_threshold(x, 0.5)
    ffn.set(t_in, None)
    assert th[0].item() == pytest.approx(t_in) and th[1].item() == OFF  # the same tensor, rewritten
    out.zero_()
    ffn(x, out)
    assert _rel(out, threshold_ffn_reference(x, packed, t_in, None)) < 1e-5
    # the masked cuBLAS path (prefill, batch above the crossover) reads the same device tensor
    t_mid = gap_threshold(_intermediate(x, packed, t_in), 0.5)
    ffn.set(t_in, t_mid)
    ref = threshold_ffn_reference(x, packed, t_in, t_mid)
    assert _rel(dense_ffn(x, packed, thresholds=th), ref) < 1e-5
    assert _rel(ref, threshold_ffn_reference(x, packed, t_in, None)) > 1e-3  # t_mid matters here


def test_bad_shapes_are_named():
    packed = random_packed_ffn(16, 2, 4, dtype=torch.float32)
    with pytest.raises(PrunePathError, match="multiple of the block"):
        ThresholdFFN(packed, 1, thresholds_tensor(0.1, 0.1, "cpu"), block_k=16, k_chunk=24)
    with pytest.raises(PrunePathError, match="float32 \\[2\\]"):
        ThresholdFFN(packed, 1, torch.zeros(3))
    ffn = ThresholdFFN(packed, 1, thresholds_tensor(0.1, 0.1, "cpu"))
    with pytest.raises(PrunePathError, match="contiguous \\[1, 16\\] input"):
        ffn(torch.zeros(2, 16), torch.zeros(2, 16))
    with pytest.raises(PrunePathError, match="float32"):
        ffn(torch.zeros(1, 16), torch.zeros(1, 16, dtype=torch.float64))


def test_bf16_thresholds_compare_as_pytorch_does():
    # PyTorch compares a bf16 tensor with a number after rounding the number to bf16: with t = 1.005 (bf16:
    # 1.0078125) an entry of exactly 1.0078125 is dropped. A kernel comparing in fp32 would keep it and read its
    # row, which holds NaN here.
    gen = torch.Generator().manual_seed(11)
    d, e, n = 16, 2, 8
    packed = random_packed_ffn(d, e, n, dtype=torch.bfloat16, generator=gen)
    x = (torch.rand(1, d, generator=gen) * 0.5).to(torch.bfloat16)
    x[0, 3] = 1.0078125
    t = 1.005
    assert bool((x.abs() <= t)[0, 3])  # PyTorch's own rule drops it
    ffn = ThresholdFFN(packed, 1, thresholds_tensor(t, None, "cpu"), block_k=16, block_m=16, block_j=8)
    ffn.w_in_t[3] = float("nan")
    out = torch.zeros(1, d)
    ffn(x, out)
    assert torch.isfinite(ffn.acc).all() and torch.isfinite(out).all()  # (a NaN h would be masked: check acc)
    ref = threshold_ffn_reference(x, packed, t, None, dtype=None)  # the bf16 PyTorch path
    assert _rel(out, ref.float()) < 2e-2


@triton.jit
def _round_kernel(v_ptr, o_ptr, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < N
    tl.store(o_ptr + offs, _round(tl.load(v_ptr + offs, mask=m, other=0.0), 1), mask=m)


def test_round_helper_matches_torch_bf16_rounding():
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(1000, generator=gen) * torch.logspace(-6, 6, 1000)
    v[:3] = torch.tensor([1.005, 1.00390625, -2.0078125 + 2 ** -9])  # above, on and near a rounding midpoint
    o = torch.empty_like(v)
    _round_kernel[(1,)](v, o, v.numel(), BLOCK=1024)
    assert torch.equal(o, v.to(torch.bfloat16).float())


def test_auto_chunk_aims_at_the_target_number_of_programs():
    from prunepath.kernels.thresholds import auto_chunk
    assert auto_chunk(100, 2048, 64) == 64  # a small layer keeps one block of rows per program
    for programs in (3000, 14336, 50000, 123457):
        c = auto_chunk(programs, 2048, 64)
        assert c % 64 == 0 and (c // 64) & (c // 64 - 1) == 0  # a power-of-two number of blocks
        runs = programs / (c // 64)
        # nearer the target (geometrically) than with half or twice as many blocks per program
        for other in (c // 2, 2 * c):
            if other >= 64:
                assert abs(torch.tensor(runs / 2048).log()) <= abs(torch.tensor(programs / (other // 64) / 2048).log())


def test_default_chunks_follow_the_layer_size(monkeypatch):
    import prunepath.kernels.thresholds as T
    gen = torch.Generator().manual_seed(7)
    packed = random_packed_ffn(64, 8, 16, dtype=torch.float32, generator=gen)  # gated: m = 256, i = 128
    small = T.ThresholdFFN(packed, 1, thresholds_tensor(None, None, "cpu"), block_k=8, block_m=32, block_j=8,
                           block_d=16)
    assert (small.k_chunk, small.j_chunk) == (8, 8)  # 64 and 64 programs: below the targets
    monkeypatch.setattr(T, "TARGET_PROGRAMS", {"in": 16, "out": 8})
    big = T.ThresholdFFN(packed, 1, thresholds_tensor(None, None, "cpu"), block_k=8, block_m=32, block_j=8,
                         block_d=16)
    assert (big.k_chunk, big.j_chunk) == (32, 64)  # 64 / 16 = 4 blocks of rows in, 64 / 8 = 8 out
    assert big.grid_in[1] == 2 and big.grid_out[1] == 2
    x = torch.randn(1, 64, generator=gen)
    t_in = gap_threshold(x, 0.4)
    t_mid = gap_threshold(_intermediate(x, packed, t_in), 0.4)
    for f in (small, big):
        f.set(t_in, t_mid)
        out = torch.zeros(1, 64)
        f(x, out)
        assert _rel(out, threshold_ffn_reference(x, packed, t_in, t_mid)) < 1e-5
