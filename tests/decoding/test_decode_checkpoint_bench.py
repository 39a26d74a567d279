"""benchmarks/decode_checkpoint.py on the CPU (Triton interpreter): a saved ungated checkpoint against its
original, every row timed and its greedy tokens kept."""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of the kernels

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the smoke run uses Triton's CPU interpreter", allow_module_level=True)

import prunepath  # noqa: E402
from test_eval_fixtures import random_text, save_tiny_llama, tiny_tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
bench = pytest.importorskip("decode_checkpoint")


def _greedy(model, prompt, n):
    """n greedy tokens through the PyTorch forward (the reference the engine's rows must match)."""
    ids = prompt
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0, prompt.shape[1]:].tolist()


def _checkpoint(tmp_path, seed: int) -> tuple[Path, Path]:
    """A tiny original model and its ungated 8-neuron checkpoint, and a calibration text: (original dir, text)."""
    orig_dir = save_tiny_llama(tmp_path / "orig", seed=seed)
    model, tok = prunepath.load_model(str(orig_dir))
    prunepath.moefy(model, neurons_per_expert=8, progress=False, clustering="random")
    prunepath.configure(model, tau=1.05, gates=False)
    prunepath.save(model, tmp_path / "ckpt", tokenizer=tok)
    calib = tmp_path / "calib.txt"
    calib.write_text(random_text(600, seed=seed - 3))
    return orig_dir, calib


def test_checkpoint_rows_against_the_original(tmp_path):
    orig_dir, calib = _checkpoint(tmp_path, seed=5)
    out = tmp_path / "r.json"
    assert bench.main(["--smoke", "--checkpoint", str(tmp_path / "ckpt"), "--original", str(orig_dir),
                       "--inner", "0.2,0.5", "--points", "0.8:0.3,0.8:0", "--calib-data", str(calib),
                       "--calib-tokens", "256", "--prompt", "w1 w2 w3", "--new", "6", "--reps", "1",
                       "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    modes = [r["mode"] for r in d["records"]]
    assert modes == ["original", "original-torch-plain", "all-on", "all-on-torch-plain", "thresholds", "thresholds",
                     "point", "point", "original-again"]
    assert all(r["ms_per_token"] > 0 for r in d["records"])
    rows = {(r["mode"], r.get("inner")): r for r in d["records"]}
    # every expert on, unscaled, no thresholds: the original FFN, so the same greedy tokens
    assert rows[("all-on", None)]["tokens"] == rows[("original", None)]["tokens"]
    assert len(rows[("all-on", None)]["tokens"]) == 6
    assert d["calib_tokens"] == 256
    # each thresholded row decodes what the PyTorch forward with the same thresholds picks greedily
    ref, tok = prunepath.load_model(str(tmp_path / "ckpt"))
    prompt = tok("w1 w2 w3", return_tensors="pt").input_ids
    for f in (0.2, 0.5):
        r = rows[("thresholds", f)]
        prunepath.configure(ref, tau=1.05, inner={"t_in": r["t_in"], "t_mid": r["t_mid"]})
        assert r["tokens"] == _greedy(ref, prompt, 6)
        assert 0 <= r["tokens_match_all_on"] <= 6
    # τ < 1: the router runs (sparse expert kernels at batch 1), with and without in-expert thresholds
    points = [r for r in d["records"] if r["mode"] == "point"]
    assert [(r["tau"], r["inner"]) for r in points] == [(0.8, 0.3), (0.8, 0.0)]
    assert all(r["ffn_path"] == "sparse" for r in points)
    assert points[1]["t_in"] == [None] * len(points[1]["t_in"]) and any(t is not None for t in points[0]["t_in"])
    for r in points:
        prunepath.configure(ref, tau=0.8, inner={"t_in": r["t_in"], "t_mid": r["t_mid"]})
        assert r["tokens"] == _greedy(ref, prompt, 6)


def test_needs_a_gpu_without_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--checkpoint", "x", "--original", "y", "--out", str(tmp_path / "r.json")]) == 2


def test_points_are_parsed_or_named_errors():
    assert bench.parse_points("0.95:0.5, 0.9:0") == [(0.95, 0.5), (0.9, 0.0)]
    assert bench.parse_points("") == []
    for bad in ("0.9", "0.9:x", "0:0.3", "0.9:1.0"):
        with pytest.raises(SystemExit, match="--points"):
            bench.parse_points(bad)


def test_sparse_ab_rows_decode_the_same_tokens(tmp_path):
    """--sparse-ab adds, after each τ:f row, the same point with the sparse expert kernels forced: same tokens
    (the path changes the speed, never the result)."""
    orig_dir, calib = _checkpoint(tmp_path, seed=6)
    out = tmp_path / "r.json"
    assert bench.main(["--smoke", "--checkpoint", str(tmp_path / "ckpt"), "--original", str(orig_dir),
                       "--inner", "", "--points", "0.7:0.3", "--sparse-ab", "--calib-data", str(calib),
                       "--calib-tokens", "256", "--prompt", "w1 w2", "--new", "5", "--reps", "1",
                       "--out", str(out)]) == 0
    recs = json.loads(out.read_text())["records"]
    modes = [r["mode"] for r in recs]
    assert modes[-3:] == ["point", "point-sparse-forced", "original-again"]
    forced = recs[-2]
    assert forced["ffn_path"] == "sparse" and forced["tokens_match_point"] is True
    assert forced["auto_over_forced"] > 0
    assert 0 < recs[-3]["s_ffn"] < 1  # the point skips some FFN bytes on its own text
