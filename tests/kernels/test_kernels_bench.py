"""Benchmark helpers that run on the CPU: density profiles, the crossover rule."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

ffn_stack = pytest.importorskip("ffn_stack")


def _profile(tmp_path):
    prof = {"model": "SmolLM2-135M-Instruct (test)", "tau": 0.6, "s_ffn": 0.8, "num_experts": 48,
            "layers": [{"layer": 1, "counts": {"48": 3}}, {"layer": 0, "counts": {"12": 1, "24": 0}}]}
    p = tmp_path / "prof.json"
    p.write_text(json.dumps(prof))
    return p


def test_profile_counts_scale_and_layer_map(tmp_path):
    prof = ffn_stack.load_profile(str(_profile(tmp_path)))
    kt = ffn_stack.profile_counts(prof, num_layers=4, num_experts=448, steps=50)
    assert kt.shape == (50, 4) and kt.dtype == torch.int32
    # target layers 0, 1 -> profile layer 0 (only 12 of 48 experts, weight on "24" is 0); 2, 3 -> layer 1 (all)
    assert torch.equal(kt[:, :2], torch.full((50, 2), 112, dtype=torch.int32))
    assert torch.equal(kt[:, 2:], torch.full((50, 2), 448, dtype=torch.int32))
    small = ffn_stack.profile_counts(prof, num_layers=2, num_experts=2, steps=5)
    assert int(small.min()) >= 1  # never below one expert


def test_profile_validation(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"layers": []}))
    with pytest.raises(SystemExit, match="num_experts"):
        ffn_stack.load_profile(str(p))


def test_crossover_rule():
    assert ffn_stack.crossover_of({1: (1.0, 2.0), 2: (2.0, 2.5), 4: (3.0, 2.9), 8: (5.0, 3.0)}) == 4
    assert ffn_stack.crossover_of({1: (1.0, 2.0), 8: (2.0, 3.0)}) is None
    assert ffn_stack.crossover_of({1: (2.0, 1.0), 2: (2.0, 1.9)}) == 1
    # a win at 2 but a loss at 4 does not count: dense must win from the crossover on
    assert ffn_stack.crossover_of({1: (1.0, 2.0), 2: (2.0, 1.0), 4: (2.0, 3.0), 8: (5.0, 3.0)}) == 8


def test_sync_calls_cuda_synchronize_once(monkeypatch):
    # The first H200 run crashed because _sync() called itself on the CUDA path (RecursionError); the CPU smoke
    # path never reached it. Fake the CUDA path: exactly one torch.cuda.synchronize per call, none on the CPU.
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(ffn_stack, "DEV", "cuda")
    ffn_stack._sync()
    ffn_stack._sync()
    assert len(calls) == 2
    monkeypatch.setattr(ffn_stack, "DEV", "cpu")
    ffn_stack._sync()
    assert len(calls) == 2


def _random_profile(g: torch.Generator, layers: int, experts: int) -> dict:
    out = []
    for i in range(layers):
        counts = torch.randint(0, 50, (experts + 1,), generator=g)
        counts[int(torch.randint(1, experts + 1, (1,), generator=g))] += 1  # at least one token per layer
        out.append({"layer": i, "counts": {str(n): int(c) for n, c in enumerate(counts.tolist()) if n and c}})
    return {"model": "test", "tau": 0.5, "s_ffn": None, "num_experts": experts, "layers": out[::-1]}


def test_profile_summary_matches_expanded_reference():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    prof = _random_profile(g, layers=5, experts=12)
    s = ffn_stack.profile_summary(prof)
    # reference: one entry per (token, layer), active fraction k / E
    per_layer = {int(r["layer"]): torch.tensor([int(k) / 12 for k, c in r["counts"].items() for _ in range(c)],
                                               dtype=torch.float64) for r in prof["layers"]}
    allv = torch.cat([per_layer[i] for i in sorted(per_layer)])
    srt = allv.sort().values
    assert s["mean_active"] == pytest.approx(float(allv.mean()), rel=1e-12)
    assert s["sd_active"] == pytest.approx(float(allv.std(unbiased=False)), rel=1e-9)
    for q in (0.1, 0.5, 0.9):
        assert s[f"q{round(q * 100)}"] == pytest.approx(float(srt[math.ceil(q * len(srt)) - 1]))
    means = torch.stack([per_layer[i].mean() for i in sorted(per_layer)])
    assert s["layer_mean_min"] == pytest.approx(float(means.min())) and s["layer_min"] == int(means.argmin())
    assert s["layer_mean_max"] == pytest.approx(float(means.max())) and s["layer_max"] == int(means.argmax())
    assert s["layer_mean_sd"] == pytest.approx(float(means.std(unbiased=False)), rel=1e-9)
    sds = torch.stack([per_layer[i].std(unbiased=False) for i in sorted(per_layer)])
    assert s["within_layer_sd_mean"] == pytest.approx(float(sds.mean()), rel=1e-9)
    assert s["layers"] == 5 and s["tokens_per_layer"] == pytest.approx(len(allv) / 5)


def test_load_profile_picks_from_study_file(tmp_path):
    g = torch.Generator().manual_seed(1)
    a, b = _random_profile(g, 3, 8), _random_profile(g, 4, 8)
    p = tmp_path / "study.json"
    p.write_text(json.dumps({"profiles": [a, b], **a}))
    assert len(ffn_stack.load_profile(str(p))["layers"]) == 3  # top level = the first profile
    assert len(ffn_stack.load_profile(f"{p}#1")["layers"]) == 4
    with pytest.raises(SystemExit, match="#0 .. #1"):
        ffn_stack.load_profile(f"{p}#2")


def test_profile_summary_cli_needs_no_gpu(tmp_path, capsys):
    p = _profile(tmp_path)
    assert ffn_stack.main(["--density-profile", str(p), "--profile-summary"]) == 0
    s = json.loads(capsys.readouterr().out)
    # layer 0: one token at 12/48; layer 1: three tokens at 48/48
    assert s["mean_active"] == pytest.approx((0.25 + 3 * 1.0) / 4)
    assert s["layer_mean_min"] == pytest.approx(0.25) and s["layer_min"] == 0


def test_no_gpu_fails_fast_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA GPU.*--smoke"):
        ffn_stack.main(["--shapes", "smollm2", "--neurons-per-expert", "16,32,64"])
    with pytest.raises(SystemExit, match="tiny shapes only"):
        ffn_stack.main(["--smoke", "--shapes", "llama3-8b"])
    with pytest.raises(SystemExit, match="unknown shape"):
        ffn_stack.main(["--shapes", "nope"])
    with pytest.raises(SystemExit, match="--neurons-per-expert"):
        ffn_stack.main(["--smoke", "--shapes", "tiny", "--neurons-per-expert", "16,x"])


def test_granularity_fields():
    g = ffn_stack.granularity(ffn_stack.SHAPES["llama3-8b"], 16)
    assert g["num_experts"] == 896 and g["router_bytes_per_layer"] == 4096 * 896 * 2
    assert g["router_bytes_frac"] == pytest.approx(1 / (3 * 16))  # E·d / (3·ff·d) = 1 / 3N for a gated FFN
    assert ffn_stack.granularity(ffn_stack.SHAPES["gpt2-medium"], 64)["router_bytes_frac"] == pytest.approx(1 / 128)
    with pytest.raises(ValueError, match="not a multiple"):
        ffn_stack.num_experts(ffn_stack.SHAPES["tiny"], 64)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "1") != "1", reason="the smoke mode runs the interpreter")
def test_smoke_times_every_expert_size_side_by_side(tmp_path, capsys):
    out = tmp_path / "gran.json"
    assert ffn_stack.main(["--smoke", "--shapes", "tiny", "--neurons-per-expert", "16,32,64", "--batches", "1",
                           "--densities", "0.3", "--modes", "sparse", "--out", str(out)]) == 0
    recs = json.loads(out.read_text())["records"]
    skipped = [r for r in recs if r["engine"] == "skipped"]
    assert [r["neurons_per_expert"] for r in skipped] == [64]  # d_ff 96 is no multiple of 64: a row, no crash
    for n, e in ((16, 6), (32, 3)):
        rows = [r for r in recs if r.get("neurons_per_expert") == n and r["engine"] != "skipped"]
        assert {r["engine"] for r in rows} == {"check-sparse", "ffn-dense-cublas", "ffn-prunepath-sparse"}
        assert all(r["num_experts"] == e and r["router_bytes_per_layer"] == 48 * e * 2 for r in rows)
        check = next(r for r in rows if r["engine"] == "check-sparse")
        assert check["routing_matches_reference"] and check["rel_err_max"] < 1e-2
        timed = next(r for r in rows if r["engine"] == "ffn-prunepath-sparse")
        assert timed["density"] == 0.3 and timed["ffn_ms"] > 0 and timed["dense_cublas_ms"] > 0
    printed = capsys.readouterr().out
    assert "expert granularity" in printed and "| tiny | 1 | sparse | 16 | 6 |" in printed


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "1") != "1", reason="the smoke mode runs the interpreter")
def test_smoke_plain_modes_check_against_the_reference(tmp_path):
    # the engine's no-router FFN, over the expert layout and over the same weights as one expert: checked
    # against the float32 FFN and timed at density 1.0 only
    out = tmp_path / "plain.json"
    assert ffn_stack.main(["--smoke", "--shapes", "tiny", "--neurons-per-expert", "16", "--batches", "1",
                           "--densities", "1.0,0.5", "--modes", "plain,plain-1,cublas-1", "--out", str(out)]) == 0
    recs = json.loads(out.read_text())["records"]
    for m in ("plain", "plain-1", "cublas-1"):
        check = next(r for r in recs if r["engine"] == f"check-{m}")
        assert check["routing_matches_reference"] and check["rel_err_max"] < 1e-2
        timed = [r for r in recs if r["engine"] == f"ffn-prunepath-{m}"]
        assert [r["density"] for r in timed] == [1.0] and timed[0]["ffn_ms"] > 0


def test_one_expert_view_keeps_every_weight():
    from prunepath.kernels.layout import PackedFFN
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    e, n, d = 3, 4, 5
    p = PackedFFN(w_in=torch.randn(e, 2 * n, d, generator=g), b_in=None, w_out=torch.randn(e, n, d, generator=g),
                  b_out=None, router_w=torch.randn(e, d, generator=g), always_on=torch.zeros(e, dtype=torch.int8),
                  activation="silu", gated=True)
    q = ffn_stack.one_expert(p)
    assert q.num_experts == 1 and q.neurons_per_expert == e * n and q.w_in.shape == (1, 2 * e * n, d)
    assert q.w_in.data_ptr() == p.w_in.data_ptr() and torch.equal(q.w_out.flatten(), p.w_out.flatten())
