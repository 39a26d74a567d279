"""Top-k reconstruction is device-consistent: every tensor it creates follows the model's device. On a GPU the
study failed with "found at least two devices, cuda:0 and cpu" (host-side accumulators); here the model runs on
the ``meta`` device, where no value can be read, and every tensor the computation touches must be on it."""

import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode

import prunepath
from prunepath.evaluation.reconstruction import _layer_errors, default_ks, topk_reconstruction
from test_eval_fixtures import one_thread, tiny_converted  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


class _Devices(TorchFunctionMode):
    """Records the device of every tensor passed to or returned by a torch function."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in [*args, *(kwargs or {}).values(), *(out if isinstance(out, (tuple, list)) else [out])]:
            if isinstance(t, torch.Tensor):
                self.seen.add(t.device.type)
        return out


def test_layer_errors_stay_on_the_model_device():
    model = tiny_converted(seed=3)
    ffn = copy.deepcopy(prunepath.prunepath_modules(model)[0]).to("meta")
    x = torch.empty(40, ffn.hidden_size, device="meta")
    ks = default_ks(ffn.num_experts)
    with _Devices() as mode:
        sse, ref, used = _layer_errors(ffn, x, ks, chunk=16)
    assert mode.seen == {"meta"}, f"tensors on {sorted(mode.seen)}: the computation mixes devices"
    assert sse.device.type == ref.device.type == used.device.type == "meta" and sse.shape == (len(ks),)


def test_layer_errors_on_cpu_match_a_direct_reference():
    model = tiny_converted(seed=4, dtype=torch.float64)
    ffn = prunepath.prunepath_modules(model)[1]
    x = torch.randn(37, ffn.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    ks = default_ks(ffn.num_experts)
    sse, ref, used = _layer_errors(ffn, x, ks, chunk=10)  # several chunks, the last one short
    assert bool(used)
    with torch.no_grad(), prunepath.routing(model, rule="all"):
        y_all = ffn(x)
    want = []
    for k in ks:
        with torch.no_grad(), prunepath.routing(model, rule="topk", k=k):
            want.append(float((ffn(x) - y_all).pow(2).sum()))
    assert sse.tolist() == pytest.approx(want, rel=1e-9, abs=1e-18)
    assert float(ref) == pytest.approx(float(y_all.pow(2).sum()), rel=1e-12)


def test_topk_reconstruction_reports_method_weighting_and_host_results():
    model = tiny_converted(seed=5)
    ids = torch.randint(4, 64, (48,), generator=torch.Generator().manual_seed(1))
    rows = topk_reconstruction(model, None, ids, window=16, progress=False)
    assert [r["k"] for r in rows] == default_ks(model.prunepath.config.num_experts)
    assert all(r["weighting"] == "method" and r["tokens"] == 48 for r in rows)
    assert all(isinstance(v, float) for r in rows for v in r["per_layer_mse"])
    assert rows[-1]["mse"] == pytest.approx(0.0, abs=1e-9) and rows[0]["mse"] > 0
