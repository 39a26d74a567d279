"""In-expert activation sparsity: thresholds inside the active experts (RoutingConfig.inner), against a float64
reference, their byte count, the batch thresholds used in training, calibration and save/load."""

from __future__ import annotations

import os

import pytest
import torch

import prunepath
from prunepath.errors import PrunePathError
from prunepath.evaluation.inner import apply_inner, collect_inner_stats, inner_spec
from prunepath.routing.config import INNER_CAP, RoutingConfig, inner_split
from prunepath.routing.ffn import batch_quantile, kth_smallest, prunepath_modules
from prunepath.stats import ActiveMeter, inner_s_per_token, sparsity
from prunepath.training.config import TrainConfig
from prunepath.training.schedule import inner_fraction, prunepath_stage_hook
from routing.test_ffn import make_ffn
from test_eval_fixtures import one_thread, tiny_converted  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def skipped(ffn) -> torch.Tensor | None:
    """Per-token fraction of the FFN's weight bytes not read in its last forward (None: thresholds off)."""
    out = inner_s_per_token(ffn)
    return None if out is None else out[0]


def reference(ffn, x, t_in, t_mid):
    """Token by token in float64: zero |x| <= t_in, run the active experts, zero |h| <= t_mid, and count the bytes
    read (gate/up columns of kept inputs per active expert, down rows of kept intermediates)."""
    r = ffn.routing
    W = {k: v.double() for k, v in ffn.state_dict().items()}
    n, E = ffn.neurons_per_expert, ffn.num_experts
    w_in = 2 / 3 if ffn.gated else 1 / 2
    ys, ss = [], []
    for xt in x.reshape(-1, x.shape[-1]).double():
        logits = W["router.weight"] @ xt
        w, mask = ffn.expert_weights(xt.float().unsqueeze(0), logits.float().unsqueeze(0))
        active = mask[0]
        xm = xt.masked_fill(xt.abs() <= t_in, 0) if t_in is not None else xt
        y = W.get("down_proj.bias", torch.zeros(ffn.hidden_size, dtype=torch.float64)).clone()
        read = 0.0
        for e in range(E):
            if not active[e]:
                continue
            sl = slice(e * n, (e + 1) * n)
            up = W["up_proj.weight"][sl] @ xm + (W["up_proj.bias"][sl] if "up_proj.bias" in W else 0)
            if ffn.gated:
                gate = W["gate_proj.weight"][sl] @ xm + (W["gate_proj.bias"][sl] if "gate_proj.bias" in W else 0)
                h = ffn.act_fn(gate) * up
            else:
                h = ffn.act_fn(up)
            keep = h.abs() > t_mid if t_mid is not None else torch.ones_like(h, dtype=torch.bool)
            h = h * keep
            read += w_in * (xm != 0).double().mean().item() / E if t_in is not None else w_in / E
            read += (1 - w_in) * keep.double().sum().item() / (E * n)
            g = torch.sigmoid(logits[e] + r.gate_offset) if r.gates else 1.0
            y = y + g * (W["down_proj.weight"][:, sl] @ h)
        ys.append(y)
        ss.append(1 - read)
    return torch.stack(ys).reshape(*x.shape[:-1], -1), torch.tensor(ss, dtype=torch.float64)


@pytest.mark.parametrize("gated,bias", [(True, False), (False, True)])
@pytest.mark.parametrize("tau", [0.6, 1.05])
def test_forward_and_bytes_match_float64_reference(gated, bias, tau):
    ffn = make_ffn(gated, bias, RoutingConfig(tau=tau, gate_offset=1.0), seed=3)
    x = torch.randn(2, 9, ffn.hidden_size, generator=torch.Generator().manual_seed(11))
    t_in = float(x.abs().flatten().kthvalue(int(0.3 * x.numel())).values)
    with torch.no_grad():
        h = ffn.intermediate(x.masked_fill(x.abs() <= t_in, 0))
    t_mid = float(h.abs().flatten().kthvalue(int(0.4 * h.numel())).values)
    ffn.routing.inner = {"t_in": [t_in], "t_mid": [t_mid]}
    with torch.no_grad():
        y = ffn(x)
    ref_y, ref_s = reference(ffn, x, t_in, t_mid)
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(skipped(ffn).double(), ref_s, rtol=0, atol=1e-6)
    assert float(skipped(ffn).mean()) > 0.2  # something was skipped beyond the experts


def test_thresholds_off_is_the_plain_ffn_and_zero_threshold_changes_nothing():
    ffn = make_ffn(True, False, RoutingConfig(tau=0.7), seed=5)
    x = torch.randn(7, ffn.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = ffn(x)
        assert skipped(ffn) is None
        ffn.routing.inner = {"t_in": [0.0], "t_mid": [None]}
        same = ffn(x)
    torch.testing.assert_close(same, plain, rtol=0, atol=0)
    # with only experts skipped, the byte count is the expert count
    torch.testing.assert_close(skipped(ffn), 1 - ffn.last_active.float().reshape(-1) / ffn.num_experts)


def test_training_thresholds_come_from_the_batch():
    ffn = make_ffn(True, False, RoutingConfig(tau=1.05), seed=1, E=8, n=16, d=64).train()
    x = torch.randn(4, 256, 64, generator=torch.Generator().manual_seed(0))
    ffn.inner_fraction = 0.3
    ffn(x)
    # about 30 % of the inputs and of the intermediates zeroed: s = (2·0.3 + 0.3) / 3 at every expert on
    assert float(skipped(ffn).mean()) == pytest.approx(0.3, abs=0.02)
    ffn.eval()
    with torch.no_grad():
        ffn(x)
    assert skipped(ffn) is None  # batch thresholds are a training device only
    v = torch.randn(100_000, generator=torch.Generator().manual_seed(1))
    exact = v.abs().sort().values[int(0.25 * v.numel()) - 1]
    assert float(batch_quantile(v, 0.25, samples=1 << 20)) == pytest.approx(float(exact), abs=1e-6)
    assert float(batch_quantile(v, 0.25, samples=20_000)) == pytest.approx(float(exact), abs=0.03)


def test_bad_thresholds_are_refused():
    with pytest.raises(PrunePathError, match="one per layer"):
        RoutingConfig(inner={"t_in": [0.1, 0.2], "t_mid": [0.1]})
    with pytest.raises(PrunePathError, match=">= 0"):
        RoutingConfig(inner={"t_in": [-0.1], "t_mid": [0.1]})
    with pytest.raises(PrunePathError, match=r"in \(0, 1\)"):
        RoutingConfig(inner={"t_in": [0.1], "t_mid": [0.1], "target": 1.5})
    model = tiny_converted(seed=1, layers=2)
    with pytest.raises(PrunePathError, match="for 1 layers"):
        apply_inner(model, {"t_in": [0.1], "t_mid": [0.1]})
    assert model.prunepath.config.routing.inner == {}  # left as it was


def test_calibration_reaches_the_fraction_and_survives_save_load(tmp_path):
    model = tiny_converted(seed=2, layers=3, router_std=0.2)
    ids = torch.randint(4, 64, (2048,), generator=torch.Generator().manual_seed(3))
    stats = collect_inner_stats(model, None, ids, window=64, samples_per_layer=1 << 16)
    spec = inner_spec(stats, 0.4)
    assert spec["target"] == 0.4 and len(spec["t_in"]) == 3 and stats.tokens == 2048
    apply_inner(model, spec)
    meter = ActiveMeter(model)
    with torch.no_grad(), prunepath.routing(model, tau=1.05):
        for chunk in ids.view(-1, 64):
            model(input_ids=chunk.unsqueeze(0))
            meter.update(model)
    res = meter.result()
    assert res["s_ffn"] == pytest.approx(0.4, abs=0.03)  # TEAL's rule: (2·0.4 + ~0.4) / 3 on the same text
    assert res["s_experts"] == 0.0
    with torch.no_grad(), prunepath.routing(model, tau=0.6):
        model(input_ids=ids[:64].unsqueeze(0))
        s_both = sparsity(model).s_ffn
    assert s_both > 0.45  # experts off on top of the thresholds
    with torch.no_grad():
        before = model(input_ids=ids[:64].unsqueeze(0)).logits
    prunepath.save(model, tmp_path / "ck")
    again, _ = prunepath.load(tmp_path / "ck")
    assert again.prunepath.config.routing.inner["t_in"] == pytest.approx(spec["t_in"])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids[:64].unsqueeze(0)).logits, before)
    apply_inner(again, None)
    assert again.prunepath.config.routing.inner == {}


def test_calibration_needs_a_window_and_a_converted_model(tiny_model):
    model = tiny_converted(seed=2, layers=2)
    with pytest.raises(PrunePathError, match="fewer than one 64-token window"):
        collect_inner_stats(model, None, torch.arange(4, 40), window=64)
    with pytest.raises(PrunePathError, match="converted model"):
        collect_inner_stats(tiny_model("llama"), None, torch.arange(4, 400), window=64)
    with pytest.raises(PrunePathError, match=r"in \(0, 1\)"):
        inner_spec(collect_inner_stats(model, None, torch.randint(4, 60, (256,)), window=64), 0.0)


def test_training_draws_the_fraction_per_step():
    cfg = TrainConfig(method="prunepath", inner_sparsity_max=0.5, inner_off_prob=0.25, seed=3)
    fs = [inner_fraction(2, s, cfg) for s in range(400)]
    assert fs == [inner_fraction(2, s, cfg) for s in range(400)]  # a resumed run replays them
    assert all(0 <= f <= 0.5 for f in fs) and inner_fraction(1, 5, cfg) == 0.0
    off = sum(f == 0 for f in fs) / len(fs)
    assert 0.15 < off < 0.35 and max(fs) > 0.45
    assert inner_fraction(2, 7, TrainConfig(method="prunepath")) == 0.0
    with pytest.raises(PrunePathError, match="inner-sparsity-max"):
        TrainConfig(method="prunepath", inner_sparsity_max=1.0)
    with pytest.raises(PrunePathError, match="inner-sparsity-max trains PrunePath"):
        TrainConfig(method="dense", inner_sparsity_max=0.3)


def test_decode_engine_runs_in_expert_thresholds_of_a_gated_checkpoint():
    # gated experts (the router scales every expert): the thresholds run inside the routed kernels, and the
    # engine's prefill gives the PyTorch forward's logits (tests/decoding covers the decode steps)
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels in Triton's CPU interpreter")
    from prunepath.decoding.engine import DecodeEngine
    model = tiny_converted(seed=1, layers=2)
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(ids).logits[:, -1]
    apply_inner(model, {"t_in": [0.1, 0.1], "t_mid": [0.1, None]})
    with torch.no_grad():
        want = model(ids).logits[:, -1]
    assert float((want - plain).abs().max()) > 1e-4
    eng = DecodeEngine(model, max_len=16, graphs=False, device="cpu")
    assert all(layer.thr is not None for layer in eng.layers)
    assert float((eng.prefill(ids) - want).abs().max()) < 2e-5


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("f,k", [(0.3, 0.0), (0.4, 0.15), (0.5, 0.25), (0.7, 0.3), (0.9, 0.5)])
def test_inner_split_keeps_the_bytes_and_the_cap(gated, f, k):
    a, b = inner_split(f, k, gated)
    w_in = 2 / 3 if gated else 1 / 2
    assert w_in * a + (1 - w_in) * b == pytest.approx(f, abs=1e-12)  # the same bytes as f on both
    assert 0 <= a <= f <= b <= INNER_CAP + 1e-12
    if k == 0:
        assert a == b == pytest.approx(f)
    with pytest.raises(PrunePathError, match="mid bias"):
        inner_split(f, 1.0, gated)
    with pytest.raises(PrunePathError, match="inner-mid-bias"):
        TrainConfig(method="prunepath", inner_sparsity_max=0.5, inner_mid_bias=-0.1)


def test_training_split_thresholds_each_tensor_at_its_own_fraction():
    ffn = make_ffn(True, False, RoutingConfig(tau=1.05), seed=4, E=8, n=16, d=64).train()
    x = torch.randn(4, 256, 64, generator=torch.Generator().manual_seed(5))
    ffn.inner_fraction = inner_split(0.4, 0.25, True)  # (0.3, 0.6)
    ffn(x)
    kept = ffn.last_inner_kept.reshape(-1, 2).mean(0)
    assert float(kept[0]) == pytest.approx(0.7, abs=0.02) and float(kept[1]) == pytest.approx(0.4, abs=0.02)
    assert float(skipped(ffn).mean()) == pytest.approx(0.4, abs=0.02)
    cfg = TrainConfig(method="prunepath", inner_sparsity_max=0.5, inner_mid_bias=0.2, seed=1)
    model = tiny_converted(seed=1, layers=2)
    step = next(s for s in range(50) if inner_fraction(2, s, cfg) > 0)
    prunepath_stage_hook(model, 2, step, 100, cfg)
    f = inner_fraction(2, step, cfg)
    assert all(m.inner_fraction == pytest.approx(inner_split(f, 0.2, True)) for m in prunepath_modules(model))


def test_block_allocation_meets_the_bytes_per_layer_and_beats_a_bad_split():
    model = tiny_converted(seed=2, layers=2, router_std=0.2)
    ids = torch.randint(4, 64, (2048,), generator=torch.Generator().manual_seed(6))
    stats = collect_inner_stats(model, None, ids, window=64, samples_per_layer=1 << 16, keep_inputs=512)
    assert all(x.shape[0] == 512 for x in stats.inputs)
    spec = inner_spec(stats, 0.4, allocation="block", model=model)
    assert spec["calibration"]["rule"] == "block"
    for a, b in zip(spec["f_in"], spec["f_mid"]):
        assert 2 / 3 * a + 1 / 3 * b == pytest.approx(0.4, abs=1e-3)

    def output_error(s):
        errs = []
        with torch.no_grad(), prunepath.routing(model, tau=1.05):
            for i, m in enumerate(prunepath_modules(model)):
                x = stats.inputs[i]
                y0 = m.thresholded_forward(x, None, None)
                y = m.thresholded_forward(x, s["t_in"][i], s["t_mid"][i])
                errs.append(float(((y - y0) ** 2).sum() / (y0 ** 2).sum()))
        return errs

    # the greedy split is no worse, layer by layer, than both fixed rules at the same bytes
    for k in (0.0, 0.5):
        other = output_error(inner_spec(stats, 0.4, mid_bias=k))
        assert all(e <= o * 1.05 + 1e-9 for e, o in zip(output_error(spec), other))
    with pytest.raises(PrunePathError, match="pass model="):
        inner_spec(stats, 0.4, allocation="block")
    with pytest.raises(PrunePathError, match="unknown in-expert allocation"):
        inner_spec(stats, 0.4, allocation="greedy", model=model)
    bare = collect_inner_stats(model, None, ids, window=64, keep_inputs=0)
    with pytest.raises(PrunePathError, match="keep_inputs"):
        inner_spec(bare, 0.4, allocation="block", model=model)


def test_kth_smallest_by_sort_and_by_selection_agree():
    # the CUDA path (sort) and the CPU path (kthvalue) of batch_quantile, both against a plain sorted list
    a = torch.randn(5001).abs()
    ref = sorted(a.tolist())
    for k in (1, 2, 1250, 2500, 5001, int(torch.randint(1, 5002, ()))):
        for by_sort in (True, False):
            assert float(kth_smallest(a, k, by_sort=by_sort)) == ref[k - 1]
