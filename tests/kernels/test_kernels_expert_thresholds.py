"""In-expert thresholds inside the routed kernels (expert kernels, dense-equivalent path, masked cuBLAS) against
the float64 reference: the router reads x, the experts the masked x, |h| ≤ t_mid dropped before the gates."""

import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of the kernels

import pytest
import torch

pytest.importorskip("triton")

from prunepath.kernels import random_packed_ffn  # noqa: E402
from prunepath.kernels.dense import GatedDense  # noqa: E402
from prunepath.kernels.experts import ExpertRunner  # noqa: E402
from prunepath.kernels.ffn import dense_ffn  # noqa: E402
from prunepath.kernels.layout import _act_reference  # noqa: E402
from prunepath.kernels.reference import ffn_reference, route_reference  # noqa: E402
from prunepath.kernels.thresholds import thresholds_tensor  # noqa: E402
from prunepath.routing.config import RoutingConfig  # noqa: E402
from kernel_numerics import gap_threshold, rel_err as _rel  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these tests run the kernels in Triton's CPU interpreter", allow_module_level=True)


def _setup(gated: bool, activation: str, bias: bool, batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    d, e, n = 40, 6, 6  # no power of two: the blocks are masked at their edges
    packed = random_packed_ffn(d, e, n, gated=gated, activation=activation, bias=bias, dtype=torch.float32,
                               router_std=3.0, generator=gen)
    x = torch.randn(batch, d, generator=gen)
    t_in = gap_threshold(x, 0.4)
    w_in, b_in, _ = packed.dense_weights()
    pre = (x.masked_fill(x.abs() <= t_in, 0).double() @ w_in.double().t()
           + (b_in.double() if b_in is not None else 0)).view(batch, e, -1)
    h = _act_reference(activation, pre[..., :n]) * pre[..., n:] if gated else _act_reference(activation, pre)
    return packed, x, t_in, gap_threshold(h[h != 0], 0.4)  # (ReLU zeros would put the quantile at 0)


@pytest.mark.parametrize("gated,activation,bias", [(True, "silu", False), (True, "gelu_tanh", True),
                                                    (False, "gelu", True), (False, "relu", False)])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("gates", [True, False])
def test_expert_kernels_with_thresholds_match_float64(gated, activation, bias, batch, gates):
    packed, x, t_in, t_mid = _setup(gated, activation, bias, batch, seed=zlib.crc32(f"{gated}{activation}{batch}".encode()))
    routing = RoutingConfig(tau=0.9, gates=gates)
    r = route_reference(x, packed, routing)
    assert 0 < int(r.count) < packed.num_experts  # experts dropped: the router matters
    runner = ExpertRunner(packed, batch)
    for t in [(t_in, t_mid), (t_in, None), (None, t_mid)]:
        out = torch.zeros(batch, packed.hidden_size)
        runner.run(x, r.ids, r.slot_w, r.count, out, thresholds=thresholds_tensor(*t, "cpu"))
        ref = ffn_reference(x, packed, routing, t_in=t[0], t_mid=t[1])
        assert _rel(out, ref) < 1e-5
        if t[0] is not None:
            assert _rel(ref, ffn_reference(x, packed, routing)) > 1e-3  # the thresholds change the output


def test_batch_one_never_reads_the_down_rows_of_dropped_entries():
    packed, x, t_in, t_mid = _setup(True, "silu", False, 1, seed=3)
    routing = RoutingConfig(tau=0.7, gates=True)
    ref = ffn_reference(x, packed, routing, t_in=t_in, t_mid=t_mid)
    r = route_reference(x, packed, routing)
    e, n = packed.num_experts, packed.neurons_per_expert
    w_in, b_in, _ = packed.dense_weights()
    pre = (x.masked_fill(x.abs() <= t_in, 0) @ w_in.t()).view(1, e, -1)
    h = (_act_reference("silu", pre[..., :n]) * pre[..., n:]).reshape(-1)
    dropped = h.abs() <= t_mid
    assert 0 < int(dropped.sum()) < h.numel()
    packed.w_out.view(e * n, -1)[dropped] = float("nan")  # a read of any of these rows poisons the output
    out = torch.zeros(1, packed.hidden_size)
    ExpertRunner(packed, 1).run(x, r.ids, r.slot_w, r.count, out, thresholds=thresholds_tensor(t_in, t_mid, "cpu"))
    assert torch.isfinite(out).all() and _rel(out, ref) < 1e-5


@pytest.mark.parametrize("gated,gates", [(True, True), (False, False), (True, False)])
def test_dense_paths_with_thresholds_match_float64(gated, gates):
    packed, x, t_in, t_mid = _setup(gated, "silu", True, 5, seed=7)
    routing = RoutingConfig(tau=0.7, gates=gates)
    thr = thresholds_tensor(t_in, t_mid, "cpu")
    ref = ffn_reference(x, packed, routing, t_in=t_in, t_mid=t_mid)
    assert _rel(ref, ffn_reference(x, packed, routing)) > 1e-3
    gd = GatedDense(packed, rule="cumulative", tau=0.7, gates=gates, thresholds=thr)
    assert _rel(gd.forward(x), ref) < 1e-5
    out = torch.ones(5, packed.hidden_size)
    gd(x, out)  # adds into out
    assert _rel(out - 1, ref) < 1e-5
    # the legacy path: routing, then dense_ffn with the gate weights and the thresholds
    assert _rel(dense_ffn(x, packed, route_reference(x, packed, routing).weights, thresholds=thr), ref) < 1e-5
