"""benchmarks/threshold_ffn.py on the CPU: its threshold placement and a smoke run (Triton interpreter)."""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of the kernels

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
bench = pytest.importorskip("threshold_ffn")

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the smoke run uses Triton's CPU interpreter", allow_module_level=True)


def test_gap_quantile_sits_between_neighbours_at_the_fraction():
    a = torch.rand(1001, generator=torch.Generator().manual_seed(0))
    for s in (0.1, 0.5, 0.9):
        t = bench.gap_quantile(a, s)
        below = int((a <= t).sum())
        assert below == int(s * 1000) + 1  # the s-quantile index and everything under it
        assert not bool((a == t).any())  # never on a value, so rounding cannot flip an entry


def test_smoke_run_checks_every_point_and_reaches_the_target(tmp_path):
    out = tmp_path / "r.json"
    assert bench.main(["--smoke", "--tunings", "1", "--sparsities", "0.5", "--engine", "smollm2",
                       "--out", str(out)]) == 0
    recs = json.loads(out.read_text())["records"]
    thr = [r for r in recs if r["mode"] == "threshold"]
    assert {r["shape"] for r in thr} == {"tiny", "tiny-gpt2"} and len(thr) == 4  # s 0 and 0.5 per shape
    assert all(r["rel_err"] < 1e-5 for r in thr)
    at = [r for r in thr if r["target_s"] == 0.5]
    assert all(abs(r["s_ffn"] - 0.5) < 0.03 for r in at)
    assert {r["mode"] for r in recs} == {"dense", "threshold", "experts", "engine-dense", "engine-teal",
                                         "engine-dense-again"}
    assert all(r["ms_per_token"] > 0 for r in recs if r["mode"].startswith("engine"))
