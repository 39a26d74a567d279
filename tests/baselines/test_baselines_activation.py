"""TEAL / CATS activation sparsity on dense models: masking against a float64 reference, measured s_FFN, threshold
calibration, greedy allocation, removal, save/load and the CLI."""

import json

import pytest
import torch

import prunepath
from prunepath.baselines.activation import (ActivationSparseFFN, ActivationSparsity, activation_modules,
                                            apply_activation_sparsity, block_allocation, calibration_batches,
                                            cats_thresholds, collect_activation_stats, load_spec,
                                            remove_activation_sparsity, save_activation_model, split_greedy,
                                            teal_thresholds)
from prunepath.cli.main import main
from prunepath.errors import PrunePathError
from prunepath.evaluation.perplexity import evaluate_perplexity
from prunepath.models.adapters import adapter_for
from prunepath.stats import activation_s_ffn, router_byte_fraction
from test_eval_fixtures import one_thread, random_text, save_tiny_llama, tiny_llama, tiny_tokenizer  # noqa: F401

CALIB = [random_text(600, seed=s) for s in range(10, 14)]


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=256,
                                   bos_token_id=1, eos_token_id=2)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)  # random biases: bias handling is exercised
    return m


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(scope="module")
def calibrated():
    """(model, stats) per architecture, calibrated once for the module."""
    torch.set_num_threads(1)
    out = {}
    for arch, make in MODELS.items():
        m = make()
        out[arch] = (m, collect_activation_stats(m, tiny_tokenizer(), CALIB, max_tokens=1024, seq_len=64,
                                                 progress=False, samples=1 << 15, cache_tokens=256))
    return out


def ids(n=2, t=24, seed=0):
    return torch.randint(3, 60, (n, t), generator=torch.Generator().manual_seed(seed))


def reference_ffn(ffn, x, t_in, t_mid, method):
    """Float64: mask x and h (CATS: act(gate)) where |v| ≤ t, compute the FFN densely; also the per-token s_FFN
    by the formula written out here."""
    x = x.double()
    w = {k: (getattr(ffn, k).double() if getattr(ffn, k) is not None else None)
         for k in ("gate_w", "gate_b", "up_w", "up_b", "down_w", "down_b")}
    lin = torch.nn.functional.linear
    d_x = x.abs() <= t_in if t_in is not None else torch.zeros_like(x, dtype=torch.bool)
    x = torch.where(d_x, torch.zeros_like(x), x)
    if ffn.gated:
        a = ffn.activation(lin(x, w["gate_w"], w["gate_b"]))
        u = lin(x, w["up_w"], w["up_b"])
        if method == "cats":
            d_h = a.abs() <= t_mid
            h = torch.where(d_h, torch.zeros_like(a), a) * u
        else:
            h = a * u
            d_h = h.abs() <= t_mid
            h = torch.where(d_h, torch.zeros_like(h), h)
    else:
        h = ffn.activation(lin(x, w["up_w"], w["up_b"]))
        d_h = h.abs() <= t_mid
        h = torch.where(d_h, torch.zeros_like(h), h)
    s_in, s_mid = d_x.double().mean(-1), d_h.double().mean(-1)
    if method == "cats":
        s = 2 * s_mid / 3
    elif ffn.gated:
        s = (2 * s_in + s_mid) / 3
    else:
        s = (s_in + s_mid) / 2
    return lin(h, w["down_w"], w["down_b"]), s


@pytest.mark.parametrize("arch,method", [("llama", "teal"), ("llama", "cats"), ("gpt2", "teal")])
def test_wrapper_matches_float64_reference_and_formula(calibrated, arch, method):
    model, stats = calibrated[arch]
    spec = cats_thresholds(stats, 0.3) if method == "cats" else teal_thresholds(stats, 0.4)
    apply_activation_sparsity(model, spec)
    try:
        for w, t_in, t_mid in zip(activation_modules(model), spec.t_in, spec.t_mid):
            x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(w.layer_index))
            with torch.no_grad():
                y = w(x)
            ref, s_ref = reference_ffn(w.dense_ffn(), x, t_in, t_mid, method)
            torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-4)
            assert w.last_s_ffn.shape == (3, 7)
            torch.testing.assert_close(w.last_s_ffn.double(), s_ref, atol=1e-6, rtol=0)
            assert 0.1 < float(w.last_s_ffn.mean()) < 0.7
    finally:
        remove_activation_sparsity(model)


def test_formula():
    assert activation_s_ffn(0.3, 0.6, gated=True) == pytest.approx(0.4)
    assert activation_s_ffn(0.0, 0.45, gated=True, method="cats") == pytest.approx(0.3)
    assert activation_s_ffn(0.2, 0.6, gated=False) == pytest.approx(0.4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_no_threshold_is_the_dense_model_and_remove_restores_it(calibrated, arch):
    model, stats = calibrated[arch]
    x = ids()
    sites = adapter_for(model).sites(model)
    originals = [getattr(s.owner, s.attr) for s in sites]
    keys = list(model.state_dict())
    with torch.no_grad():
        dense = model(input_ids=x).logits
        n = stats.num_layers
        apply_activation_sparsity(model, ActivationSparsity("teal", 0.0, "uniform", [None] * n, [None] * n))
        assert torch.equal(model(input_ids=x).logits, dense)
        assert prunepath.sparsity(model).s_ffn == 0.0
        apply_activation_sparsity(model, ActivationSparsity("teal", 0.0, "uniform", [0.0] * n, [0.0] * n))
        assert torch.equal(model(input_ids=x).logits, dense)  # zeroing exact zeros changes nothing
        apply_activation_sparsity(model, teal_thresholds(stats, 0.5))
        assert len(activation_modules(model)) == n  # applied again: thresholds updated, not wrapped twice
        assert not torch.allclose(model(input_ids=x).logits, dense)
        remove_activation_sparsity(model)
        assert torch.equal(model(input_ids=x).logits, dense)
    assert [getattr(s.owner, s.attr) for s in sites] == originals
    assert list(model.state_dict()) == keys and model.prunepath.activation is None


@pytest.mark.parametrize("arch,method,target", [("llama", "teal", 0.4), ("llama", "cats", 0.3), ("gpt2", "teal", 0.5)])
def test_calibrated_thresholds_give_the_target_on_calibration_data(calibrated, arch, method, target):
    model, stats = calibrated[arch]
    spec = cats_thresholds(stats, target) if method == "cats" else teal_thresholds(stats, target)
    mid = 1.5 * target if method == "cats" else target
    assert spec.s_mid == pytest.approx([mid] * stats.num_layers, abs=0.01)
    if method == "teal":
        assert spec.s_in == pytest.approx([target] * stats.num_layers, abs=0.01)
    apply_activation_sparsity(model, spec)
    try:
        meter_s, tokens = [], 0
        with torch.no_grad():
            for b in calibration_batches(model, tiny_tokenizer(), CALIB, max_tokens=1024, seq_len=64):
                model(input_ids=b)
                meter_s.append(prunepath.sparsity(model).s_ffn * b.numel())
                tokens += b.numel()
        # measured with every layer sparsified at once (later layers see sparsified inputs)
        assert sum(meter_s) / tokens == pytest.approx(target, abs=0.03)
    finally:
        remove_activation_sparsity(model)


def test_greedy_reaches_the_target_and_spares_the_sensitive_layer():
    torch.set_num_threads(1)
    m = tiny_llama(layers=2)
    with torch.no_grad():
        # Layer 1's FFN input: 28 of 32 features nearly zero, so dropping small entries costs it almost nothing.
        norm = m.model.layers[1].post_attention_layernorm.weight
        norm.fill_(1e-3)
        norm[:4] = 3.0
    stats = collect_activation_stats(m, tiny_tokenizer(), CALIB, max_tokens=1024, seq_len=64, progress=False,
                                     samples=1 << 15, cache_tokens=256)
    spec = teal_thresholds(stats, 0.4, "greedy")
    from prunepath.baselines.activation import greedy_allocation

    s_in, s_mid = greedy_allocation(stats, 0.4)
    layer_s = [activation_s_ffn(a, b, gated=True) for a, b in zip(s_in, s_mid)]
    assert sum(layer_s) / 2 == pytest.approx(0.4, abs=1e-9)
    assert s_in[1] > s_in[0] + 0.2 and layer_s[1] > layer_s[0]
    assert spec.allocation == "greedy" and spec.s_in[1] > spec.s_in[0]


def brute_force_split(error, target, weights, step):
    """The split_greedy path by hand: every step tries both tensors and keeps the cheaper per byte."""
    level, total, err = [0.0, 0.0], 0.0, error(0.0, 0.0)
    while total < target - 1e-12:
        costs = []
        for k in range(2):
            trial = list(level)
            trial[k] += step
            costs.append((error(*trial) - err) / (weights[k] * step))
        k = 0 if costs[0] <= costs[1] else 1
        gain = min(weights[k] * step, target - total)
        level[k] += gain / weights[k]
        total += gain
        err = error(*level)
    return tuple(level)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_greedy_matches_a_hand_walk_and_meets_the_byte_target(seed):
    g = torch.Generator().manual_seed(seed)
    a, b, p = (float(v) for v in torch.rand(3, generator=g) * torch.tensor([3.0, 3.0, 2.0]) + torch.tensor([0.1, 0.1, 1.5]))
    error = lambda u, v: a * u ** p + b * v ** p  # noqa: E731  (convex, random weights)
    target = float(torch.rand(1, generator=g) * 0.6 + 0.1)
    got = split_greedy(error, target, (2 / 3, 1 / 3), step=0.05)
    want = brute_force_split(error, target, (2 / 3, 1 / 3), 0.05)
    assert got == pytest.approx(want, abs=1e-12)
    assert 2 / 3 * got[0] + 1 / 3 * got[1] == pytest.approx(target, abs=1e-9)
    # the tensor whose error grows faster gets less of the sparsity
    cheap = split_greedy(lambda u, v: 10 * u ** 2 + v ** 2, 0.4, (2 / 3, 1 / 3))
    assert cheap[1] > cheap[0]


def test_block_allocation_keeps_every_layer_at_the_target():
    torch.set_num_threads(1)
    m = tiny_llama(layers=2)
    stats = collect_activation_stats(m, tiny_tokenizer(), CALIB, max_tokens=1024, seq_len=64, progress=False,
                                     samples=1 << 15, cache_tokens=256)
    s_in, s_mid = block_allocation(stats, 0.4)
    for a, b in zip(s_in, s_mid):
        assert activation_s_ffn(a, b, gated=True) == pytest.approx(0.4, abs=1e-9)
        assert 0 <= a <= 0.95 and 0 <= b <= 0.95
    spec = teal_thresholds(stats, 0.4, "block")
    assert spec.allocation == "block" and spec.s_in == pytest.approx(s_in, abs=0.02)


def test_perplexity_reports_measured_s_ffn(calibrated, tmp_path):
    model, stats = calibrated["llama"]
    data = tmp_path / "valid.txt"
    data.write_text(random_text(300, seed=1))
    tok = tiny_tokenizer()
    dense = evaluate_perplexity(model, tok, str(data), window=64, progress=False)
    apply_activation_sparsity(model, teal_thresholds(stats, 0.4))
    try:
        res = evaluate_perplexity(model, tok, str(data), window=64, progress=False)
        model.to(torch.bfloat16)
        res16 = evaluate_perplexity(model, tok, str(data), window=64, progress=False)
    finally:
        model.to(torch.float32)
        remove_activation_sparsity(model)
    assert dense["s_ffn"] == 0.0
    assert res["s_ffn"] == pytest.approx(0.4, abs=0.05) and len(res["per_layer_s_ffn"]) == 2
    assert res["s_ffn"] == pytest.approx(sum(res["per_layer_s_ffn"]) / 2)
    assert res["activation_sparsity"]["method"] == "teal" and "TEAL" in res["model"]
    assert res["ppl"] != dense["ppl"] and res["stat_tokens"] == res["tokens"]
    assert res16["dtype"] == "bfloat16" and res16["s_ffn"] == pytest.approx(res["s_ffn"], abs=0.03)


def test_save_load_round_trip(calibrated, tmp_path):
    model, stats = calibrated["llama"]
    tok = tiny_tokenizer()
    spec = cats_thresholds(stats, 0.3)
    x = ids()
    apply_activation_sparsity(model, spec)
    try:
        with torch.no_grad():
            want = model(input_ids=x).logits
        out = save_activation_model(model, tok, tmp_path / "cats", spec)
        assert activation_modules(model)  # saving put the wrappers back
    finally:
        remove_activation_sparsity(model)
    assert load_spec(out) == spec
    loaded, ltok = prunepath.load_model(str(out))
    assert loaded.prunepath.activation == spec and ltok is not None
    with torch.no_grad():  # a fresh load may pick another attention kernel: equal up to float rounding
        torch.testing.assert_close(loaded(input_ids=x).logits, want, atol=1e-5, rtol=1e-5)
    remove_activation_sparsity(loaded)
    assert not any(isinstance(m, ActivationSparseFFN) for m in loaded.modules())
    assert ActivationSparsity.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_errors(calibrated):
    model, stats = calibrated["llama"]
    gpt2, gstats = calibrated["gpt2"]
    tok = tiny_tokenizer()
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(PrunePathError, match=r"in \(0, 1\)"):
            teal_thresholds(stats, bad)
    with pytest.raises(PrunePathError, match="at most 2/3"):
        cats_thresholds(stats, 0.7)
    with pytest.raises(PrunePathError, match="unknown allocation"):
        teal_thresholds(stats, 0.3, "random")
    with pytest.raises(PrunePathError, match="gated FFN"):
        cats_thresholds(gstats, 0.3)
    with pytest.raises(PrunePathError, match="gated FFN"):
        apply_activation_sparsity(gpt2, ActivationSparsity("cats", 0.3, "uniform", [None] * 2, [0.1] * 2))
    with pytest.raises(PrunePathError, match="missing or empty"):
        collect_activation_stats(model, tok, [], progress=False)
    with pytest.raises(PrunePathError, match="missing or empty"):
        collect_activation_stats(model, tok, ["  ", ""], progress=False)
    with pytest.raises(PrunePathError, match="fewer than seq_len"):
        collect_activation_stats(model, tok, ["w1 w2 w3"], max_tokens=256, seq_len=64, progress=False)
    with pytest.raises(PrunePathError, match="shorter than one window"):
        collect_activation_stats(model, tok, CALIB, max_tokens=32, seq_len=64, progress=False)
    with pytest.raises(PrunePathError, match="layers of thresholds"):
        apply_activation_sparsity(model, ActivationSparsity("teal", 0.3, "uniform", [0.1] * 3, [0.1] * 3))

    class Foreign(torch.nn.Module):
        config = type("C", (), {"model_type": "mamba"})()

    with pytest.raises(PrunePathError, match="unsupported architecture"):
        apply_activation_sparsity(Foreign(), teal_thresholds(stats, 0.3))
    converted = tiny_llama()
    prunepath.moefy(converted, neurons_per_expert=8, progress=False)
    with pytest.raises(PrunePathError, match="original dense model"):
        apply_activation_sparsity(converted, teal_thresholds(stats, 0.3))
    assert router_byte_fraction(converted) == pytest.approx(8 / (3 * 64))  # Linear(32, 8) vs 3·32·64


def test_cli_baseline_eval_and_sweep(tmp_path, capsys, one_thread):  # noqa: F811
    model_dir = save_tiny_llama(tmp_path / "tiny")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(CALIB))
    data = tmp_path / "valid.txt"
    data.write_text(random_text(300, seed=1))
    common = ["--model", str(model_dir), "--calib-data", str(calib), "--calib-tokens", "512", "--calib-seq-len",
              "64", "--no-progress"]
    assert main(["baseline", "--method", "teal", "--sparsity", "0.4", "--allocate", "greedy",
                 "--out", str(tmp_path / "teal"), *common]) == 0
    assert "TEAL" in capsys.readouterr().out
    spec = json.loads((tmp_path / "teal" / "prunepath_activation.json").read_text())
    assert spec["method"] == "teal" and spec["allocation"] == "greedy" and len(spec["t_mid"]) == 2
    assert main(["eval", "--model", str(tmp_path / "teal"), "--task", "ppl", "--data", str(data), "--window", "64",
                 "--json", str(tmp_path / "teal.json")]) == 0
    res = json.loads((tmp_path / "teal.json").read_text())
    assert res["s_ffn"] == pytest.approx(0.4, abs=0.06) and res["s_ffn_kind"].startswith("activation")

    # bad input exits 2 before any model is loaded or anything is written
    for extra, msg in ((["--method", "cats", "--sparsity", "0.7"], "at most 2/3"),
                       (["--method", "teal", "--sparsity", "1.2"], "must be in"),
                       (["--method", "teal"], "needs --sparsity")):
        assert main(["baseline", *extra, "--out", str(tmp_path / "bad"), *common]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()

    assert main(["sweep", "--model", str(model_dir), "--method", "cats", "--sparsities", "0.2,0.4", "--task", "ppl",
                 "--data", str(data), "--window", "64", "--calib-data", str(calib), "--calib-tokens", "512",
                 "--no-progress", "--out", str(tmp_path / "sw")]) == 0
    result = tmp_path / "sw" / "results.json"  # the sweep's --out: a directory (older releases: a prefix)
    rows = json.loads((result if result.exists() else tmp_path / "sw.json").read_text())["rows"]
    assert [r["target_sparsity"] for r in rows] == [0.2, 0.4]
    assert rows[0]["s_ffn"] < rows[1]["s_ffn"] and rows[1]["s_ffn"] == pytest.approx(0.4, abs=0.08)
