"""scripts/paired_logs.py: step-by-step comparison of two training logs that drew the same τ."""

import importlib.util
import json
import random
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("paired_logs", Path(__file__).parents[1] / "scripts/paired_logs.py")
paired = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paired)


def _write(path, taus, values):
    lines = [json.dumps({"step": 10 * (i + 1), "stage": 2, "tau": t, "distill": v})
             for i, (t, v) in enumerate(zip(taus, values))]
    path.write_text("\n".join([json.dumps({"step": 0, "stage": 1, "tau": 1.05, "distill": 9.0})] + lines) + "\n")


def test_paired_ratio_and_the_all_expert_subset(tmp_path, capsys):
    rng = random.Random()
    taus = [rng.choice([1.05, rng.uniform(0.5, 1.0)]) for _ in range(40)]
    a = [rng.uniform(0.1, 1.0) for _ in taus]
    factor = [1.1 if t > 1 else 1.5 for t in taus]  # b is a known multiple of a, different where τ > 1
    _write(tmp_path / "a.jsonl", taus, a)
    _write(tmp_path / "b.jsonl", taus, [x * f for x, f in zip(a, factor)])
    rows = paired.compare(paired.load(tmp_path / "a.jsonl"), paired.load(tmp_path / "b.jsonl"), "distill",
                          [0, 200, 1000])
    assert [r["n"] for r in rows if r["subset"] == "all steps"] == [19, 21]  # steps 10-190 and 200-400
    for r in rows:
        if r["subset"] == "τ > 1":
            assert r["median_ratio"] == pytest.approx(1.1)
    first = rows[0]
    want = [(x, x * f) for s, x, f in zip(range(10, 200, 10), a, factor)]
    assert first["a"] == pytest.approx(sum(p for p, _ in want) / len(want))
    assert first["b"] == pytest.approx(sum(q for _, q in want) / len(want))
    assert paired.main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--windows", "0,1000"]) == 0
    assert "median ratio" in capsys.readouterr().out


def test_logs_with_other_draws_are_refused(tmp_path):
    _write(tmp_path / "a.jsonl", [1.05, 0.7], [0.2, 0.3])
    _write(tmp_path / "b.jsonl", [1.05, 0.8], [0.2, 0.3])
    with pytest.raises(SystemExit, match="different τ"):
        paired.compare(paired.load(tmp_path / "a.jsonl"), paired.load(tmp_path / "b.jsonl"), "distill", [0, 100])
