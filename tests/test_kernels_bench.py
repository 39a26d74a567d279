"""Benchmark helpers that run on the CPU: density profiles, the crossover rule."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

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
