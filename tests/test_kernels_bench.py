"""Benchmark helpers that run on the CPU: density profiles, the crossover rule."""

import json
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
