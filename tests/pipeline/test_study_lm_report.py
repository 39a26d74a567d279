"""The study report builder: interpolation against a direct reference, and the files it writes."""

import json
import math
import random

import pytest

from prunepath.pipeline import study_report


def test_ppl_at_matches_log_linear_interpolation():
    rng = random.Random(0)
    for _ in range(20):
        s = sorted(rng.uniform(0, 0.9) for _ in range(5))
        ppl = sorted((rng.uniform(10, 100) for _ in range(5)))
        pts = [{"s_ffn": a, "ppl": b} for a, b in zip(s, ppl)]
        x = rng.uniform(s[0], s[-1])
        i = max(j for j in range(4) if s[j] <= x)
        w = (x - s[i]) / (s[i + 1] - s[i])
        ref = math.exp(math.log(ppl[i]) * (1 - w) + math.log(ppl[i + 1]) * w)
        assert study_report.ppl_at(pts, x) == pytest.approx(ref)
        assert study_report.ppl_at(pts, s[-1] + 0.01) is None
        assert study_report.ppl_at(pts, s[2]) == pytest.approx(ppl[2])


def _rows():
    base = {"model": "M (Q4_1, dequantised)", "eval_tokens": 1000, "train_tokens": 500, "seed": 0, "window": 512}
    rows = [{**base, "method": "dense", "s_ffn": 0.0, "ppl": 20.0, "tau": None, "train_tokens": 0},
            {**base, "method": "dense-finetuned", "s_ffn": 0.0, "ppl": 18.0, "tau": None}]
    for tau, s, p in ((1.05, 0.0, 18.5), (0.8, 0.35, 20.0), (0.6, 0.5, 22.0), (0.4, 0.7, 30.0)):
        rows.append({**base, "method": "prunepath-sweep", "variant": "warmstart+offset", "s_ffn": s, "ppl": p,
                     "tau": tau})
    rows.append({**base, "method": "prunepath", "variant": "warmstart+offset", "s_ffn": 0.5, "ppl": 22.0, "tau": 0.6,
                 "tau_min": 0.6})
    for k, s, p in ((24, 0.5, 40.0), (12, 0.75, 90.0)):
        rows.append({**base, "method": "moefication-topk", "s_ffn": s, "ppl": p, "tau": None, "k": k, "knob": {"k": k}})
    return rows


def test_build_writes_tables_plot_and_rouge(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    (res / "lm-x.json").write_text(json.dumps(_rows()))
    (res / "topk-x.json").write_text(json.dumps([{"router": "prunepath", "k": k, "rel_mse": 1 / k} for k in (1, 2)]))
    preds = [{"system": "dense", "tau": None, "prediction": "the cat sat", "reference": "the cat sat"},
             {"system": "prunepath@0.6", "tau": 0.6, "prediction": "a dog", "reference": "the cat sat"},
             {"system": "prunepath@0.8", "tau": 0.8, "prediction": "the cat sat\nuser\nsummarise",
              "reference": "the cat sat"}]
    (res / "gen-x-predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    out = study_report.build(res, "x", tmp_path / "docs", tmp_path / "docs" / "img")
    md = (tmp_path / "docs" / "results" / "study-lm-x.md").read_text()
    assert (tmp_path / "docs" / "img" / "study-lm-x.png").stat().st_size > 1000
    assert "22.00 (1.10×, 1.22× ft)" in md  # 22 against the original (20) and against dense fine-tuned (18)
    at4 = math.exp(math.log(20.0) * 2 / 3 + math.log(22.0) / 3)  # between s 0.35 and 0.5
    assert f"| PrunePath (warm start + gate offset), τ sweep | 0.925× met | {at4 / 20:.3f}× met | 1.100× met |" in md
    gen = json.loads((tmp_path / "docs" / "results" / "gen-x.json").read_text())
    by = {s["system"]: s for s in gen["xsum"]["systems"]}
    assert by["dense"]["rougeL"] == pytest.approx(1.0) and by["prunepath@0.6"]["rougeL"] == 0.0
    # a prediction that runs on into a turn of its own is counted, and scored whole and cut where the turn begins
    assert by["prunepath@0.8"]["new_turn_runs"] == 1 and by["dense"]["new_turn_runs"] == 0
    assert by["prunepath@0.8"]["rougeL"] < 1.0 and by["prunepath@0.8"]["rougeL_turn_cut"] == pytest.approx(1.0)
    assert set(out) >= {"lm", "plot", "markdown", "topk", "gen"}


def test_topk_table_names_failed_routers():
    ok = [{"router": "prunepath", "k": k, "rel_mse": 1 / k} for k in (1, 2)]
    bad = [{"router": "moefication", "error": "RuntimeError('devices')"}]
    only_bad = study_report.topk_table(bad)
    assert "(no top-k reconstruction results)" in only_bad and "moefication: failed" in only_bad
    mixed = study_report.topk_table(ok + bad)
    assert "| prunepath | 1.000 | 0.500 |" in mixed and "moefication: failed, `RuntimeError('devices')`" in mixed


def test_targets_check_against_the_original_and_the_training_free_baselines():
    """Issue 13's targets are ratios to the ORIGINAL model (not dense fine-tuned), for every trained setting;
    the last column compares with the best training-free curve at equal FFN bytes, router bytes counted."""
    rows = _rows()
    base = {k: rows[0][k] for k in ("model", "eval_tokens", "seed", "window")}
    for tau, s, p in ((1.05, 0.0, 20.3), (0.7, 0.4, 21.0), (0.5, 0.6, 23.0)):
        rows.append({**base, "method": "prunepath-sweep", "variant": "distill", "s_ffn": s, "ppl": p, "tau": tau,
                     "train_tokens": 500, "router_bytes_frac": 0.05})
    for s, p in ((0.2, 20.5), (0.45, 21.5), (0.7, 40.0)):
        rows.append({**base, "method": "teal", "s_ffn": s, "ppl": p, "tau": None, "train_tokens": 0})
    lines = study_report.targets_check(rows).splitlines()
    assert "below the best of TEAL" in lines[0]
    row = next(x for x in lines if x.startswith("| PrunePath (distill)"))
    assert "1.015× met" in row and "1.050× met" in row  # 20.3 / 20 with every expert on; 21 / 20 at s 0.4
    at5 = math.exp(0.5 * math.log(21.0) + 0.5 * math.log(23.0))  # log-linear between s 0.4 and 0.6
    assert f"{at5 / 20:.3f}× met" in row
    # router counted: PrunePath's 0.4 point moves to 0.35; at s 0.4 it is then between 21 and 23, TEAL 21.2
    mine = math.exp(math.log(21.0) + (0.4 - 0.35) / 0.2 * (math.log(23.0) - math.log(21.0)))
    teal = math.exp(math.log(20.5) + (0.4 - 0.2) / 0.25 * (math.log(21.5) - math.log(20.5)))
    assert f"0.4: {'yes' if mine < teal else 'no'} ({mine / 20:.2f}× vs {teal / 20:.2f}×)" in row
    no_orig = [r for r in rows if r["method"] != "dense"]
    assert study_report.targets_check(no_orig) == "(no original-model record or PrunePath curve yet)"

def test_inner_grid_is_read_along_its_lines_not_across_its_front():
    """A τ × fraction grid: the value at s is the best of its one-knob lines (fraction at each τ, and the τ
    sweep), each interpolated log-linearly; a front point that only differs by calibration noise in s does not
    pull the value up."""
    rows = _rows()
    base = {k: rows[0][k] for k in ("model", "eval_tokens", "seed", "window")}
    v = "inner-run"
    for tau, s, p in ((1.05, 0.0, 20.1), (0.9, 0.3, 24.0), (0.8, 0.5, 30.0)):
        rows.append({**base, "method": "prunepath-sweep", "variant": v, "s_ffn": s, "ppl": p, "tau": tau})
    grid = [(1.05, 0.4, 0.395, 21.0), (1.05, 0.5, 0.495, 22.0), (1.05, 0.6, 0.595, 26.0),
            (0.9, 0.4, 0.4997, 23.9), (0.9, 0.5, 0.5001, 30.0), (0.9, 0.6, 0.62, 33.0)]
    for tau, f, s, p in grid:
        rows.append({**base, "method": "prunepath-inner-grid", "variant": v, "tau": tau, "inner_target": f,
                     "inner_allocation": "uniform", "s_ffn": s, "ppl": p, "router_bytes_frac": 0.01})
    lines = study_report.inner_lines(rows, v)
    assert len(lines) == 3  # the τ sweep, and the fraction at τ 1.05 and at τ 0.9 (each from its τ's own point)
    assert [r["ppl"] for r in lines[2]] == [20.1, 21.0, 22.0, 26.0]
    # at s 0.5: τ 1.05 line between 0.495 (22) and 0.595 (26); τ 0.9 line between 0.4997 (23.9) and 0.5001 (30)
    along = math.exp(math.log(22.0) + 0.05 * (math.log(26.0) - math.log(22.0)))
    across = math.exp(math.log(23.9) + (0.5 - 0.4997) / 0.0004 * (math.log(30.0) - math.log(23.9)))
    got = study_report.curve_ppl_at(rows, "prunepath-inner", v, 0.5)
    assert got == pytest.approx(min(along, across)) and got == pytest.approx(along)
    assert study_report.curve_ppl_at(rows, "prunepath-inner", v, 0.9) is None  # beyond every line
    # a curve without a grid is read as before
    assert study_report.curve_ppl_at(rows, "prunepath-sweep", v, 0.4) == pytest.approx(
        study_report.ppl_at(study_report.curve(rows, "prunepath-sweep", v), 0.4))


def test_every_point_table_gives_the_router_bytes_each_point_reads():
    base = {"model": "M", "eval_tokens": 1000, "train_tokens": 500, "method": "prunepath-sweep", "variant": "v",
            "router_bytes_frac": 0.0208}
    rows = [{"model": "M", "method": "dense", "s_ffn": 0.0, "ppl": 20.0, "tau": None},
            {**base, "s_ffn": 0.1, "ppl": 21.0, "tau": 1.05, "gates": False},
            {**base, "s_ffn": 0.2, "ppl": 22.0, "tau": 0.9, "gates": False},
            {**base, "s_ffn": 0.3, "ppl": 23.0, "tau": 1.05, "gates": True}]
    cells = {line.split("|")[4].strip(): line.split("|")[5].strip()
             for line in study_report.records_table(rows).splitlines()[2:]}
    assert cells == {"0.000": "", "0.100": "0.0000", "0.200": "0.0208", "0.300": "0.0208"}
