"""benchmarks/decode.py on the CPU (tiny shape, Triton interpreter): --auto-only times exactly the FFN path the
engine's ffn="auto" would run, and every timed engine record carries the memory fields."""

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of the kernels

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs the kernels in Triton's CPU interpreter", allow_module_level=True)

from test_eval_fixtures import one_thread  # noqa: E402,F401

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
decode = pytest.importorskip("decode")


@pytest.mark.usefixtures("one_thread")
def test_auto_only_times_the_path_auto_picks():
    recs = decode.run_shape("llama3-8b", [1, 2], [1.0, 0.3], 6, 3, torch.device("cpu"), "cpu", 1e11, tiny=True,
                            log=lambda s: None, hf_new=0, grouped_densities=(), auto_only=True)
    got = {(r["batch"], r["density"], r["engine"]) for r in recs if r["engine"].startswith("prunepath")}
    # batch 1 (< the default crossover 2): d = 1.0 -> dense-equivalent (τ > 1) + the sparse kernels for their
    # full-density cost; d = 0.3 -> sparse only. Batch 2: dense-equivalent only, at every density.
    assert got == {(1, 1.0, "prunepath-dense"), (1, 1.0, "prunepath-sparse"), (1, 1.0, "prunepath"),
                   (1, 0.3, "prunepath-sparse"), (1, 0.3, "prunepath"),
                   (2, 1.0, "prunepath-dense"), (2, 1.0, "prunepath"),
                   (2, 0.3, "prunepath-dense"), (2, 0.3, "prunepath")}
    picked = {(r["batch"], r["density"]): r["picked_mode"] for r in recs if r["engine"] == "prunepath"}
    assert picked == {(1, 1.0): "dense", (1, 0.3): "sparse", (2, 1.0): "dense", (2, 0.3): "dense"}
    timed = [r for r in recs if r["engine"] in ("dense-graph", "prunepath-dense", "prunepath-sparse")]
    assert timed and all("start_mem_mb" in r and "peak_mem_mb" in r and r["ms_per_token"] > 0 for r in timed)
    assert all(r["command"].startswith("python3") for r in timed)
    sparse = [r for r in recs if r["engine"] == "prunepath-sparse" and r["density"] == 0.3]
    assert 0 < sparse[0]["measured_density"] < 1  # the forced τ really dropped experts


@pytest.mark.usefixtures("one_thread")
def test_expert_sizes_are_converted_and_recorded_side_by_side():
    recs = decode.run_shape("llama3-8b", [1], [0.3], 6, 3, torch.device("cpu"), "cpu", 1e11, tiny=True,
                            log=lambda s: None, hf_new=0, grouped_densities=(), auto_only=True, neurons=(64, 48, 128))
    # tiny llama: hidden 64, d_ff 256 -> E = 4 at N = 64, 2 at N = 128; 48 does not divide 256 (a row, no crash)
    assert [r["neurons_per_expert"] for r in recs if r["engine"] == "skipped"] == [48]
    sparse = {r["neurons_per_expert"]: r for r in recs if r["engine"] == "prunepath-sparse"}
    assert sorted(sparse) == [64, 128]
    for n, e in ((64, 4), (128, 2)):
        r = sparse[n]
        assert r["num_experts"] == e and r["router_bytes_per_layer"] == 64 * e * 4  # fp32 on the CPU
        assert r["router_bytes_frac"] == pytest.approx(1 / (3 * n)) and r["ms_per_token"] > 0
    assert sum(r["engine"] == "dense-graph" for r in recs) == 1  # the dense baseline is timed once
