"""τ sweeps, target-sparsity calibration, top-k reconstruction, and reports/plots."""

from __future__ import annotations


import pytest
import torch

import prunepath
from prunepath.errors import PrunePathError
from prunepath.evaluation.calibration import find_tau_for_sparsity, measure_sparsity
from prunepath.evaluation.perplexity import evaluate_perplexity
from prunepath.evaluation.reconstruction import default_ks, topk_reconstruction
from prunepath.evaluation.sweep import sweep
from test_eval_fixtures import one_thread, tiny_converted, tiny_llama  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(n, seed=0):
    return torch.randint(4, 64, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_sweep_rows_monotone_and_equal_to_single_runs():
    model = tiny_converted(seed=1)
    ids = _ids(300)
    taus = [0.9, 0.2, 1.05, 0.5, 0.7, 0.5]
    rows = sweep(model, None, "ppl", ids, taus, window=32, progress=False)
    assert [r["tau"] for r in rows] == [0.2, 0.5, 0.7, 0.9, 1.05]  # sorted, de-duplicated
    s = [r["s_ffn"] for r in rows]
    assert all(a >= b for a, b in zip(s, s[1:])) and s[0] > s[-1] and s[-1] == 0.0
    assert model.prunepath.config.routing.tau == 1.05  # routing restored
    prunepath.configure(model, tau=0.5)
    single = evaluate_perplexity(model, None, ids, window=32, progress=False)
    assert rows[1]["ppl"] == pytest.approx(single["ppl"], rel=1e-9) and rows[1]["s_ffn"] == single["s_ffn"]
    for r in rows:
        assert {"ppl", "tokens", "s_ffn", "window", "stride", "tau"} <= set(r)


def test_sweep_rejects_bad_taus_and_dense_models():
    model = tiny_converted()
    for bad in ([0.0, 0.5], [2.5], [], [-1]):
        with pytest.raises(PrunePathError, match=r"\(0, 2\]"):
            sweep(model, None, "ppl", _ids(50), bad, window=16, progress=False)
    with pytest.raises(PrunePathError, match="converted"):
        sweep(tiny_llama(), None, "ppl", _ids(50), [0.5], progress=False)
    from prunepath.cli.common import parse_taus
    with pytest.raises(PrunePathError):
        parse_taus("0.5,abc")


@pytest.mark.parametrize("target", [0.3, 0.55, 0.8])
def test_target_sparsity_calibration_within_tolerance(target):
    model = tiny_converted(seed=2, layers=3)
    ids = torch.tensor(_ids(512, seed=5))
    cal = find_tau_for_sparsity(model, None, ids, target, tol=0.01, window=64, progress=False)
    assert abs(cal["s_ffn"] - target) <= 0.01 and cal["within_tol"]
    with prunepath.routing(model, tau=cal["tau"]):  # the reported τ really gives that sparsity
        assert measure_sparsity(model, ids, window=64) == pytest.approx(cal["s_ffn"], abs=1e-12)
        assert evaluate_perplexity(model, None, ids, window=64, progress=False)["s_ffn"] == pytest.approx(
            cal["s_ffn"], abs=0.01)
    assert model.prunepath.config.routing.tau == 1.05


def test_calibration_rejects_unreachable_targets():
    model = tiny_converted(seed=2)
    with pytest.raises(PrunePathError, match="beyond reach"):
        find_tau_for_sparsity(model, None, _ids(200), 0.95, progress=False)  # top-1 of 8 experts = 0.875
    with pytest.raises(PrunePathError, match=r"\[0, 1\)"):
        find_tau_for_sparsity(model, None, _ids(200), 1.2, progress=False)
    with pytest.raises(PrunePathError, match="converted"):
        find_tau_for_sparsity(tiny_llama(), None, _ids(200), 0.5, progress=False)


def test_sweep_by_target_sparsities():
    model = tiny_converted(seed=3)
    rows = sweep(model, None, "ppl", _ids(256), target_sparsities=[0.4, 0.6], window=64, progress=False)
    assert [r["target_sparsity"] for r in rows] == [0.4, 0.6]
    assert all(abs(r["s_ffn"] - r["target_sparsity"]) < 0.03 for r in rows)


def test_topk_reconstruction_matches_forward_reference():
    model = tiny_converted(seed=6, dtype=torch.float64)
    ids = torch.tensor(_ids(40, seed=2))
    rows = topk_reconstruction(model, None, ids, window=16, progress=False)
    assert [r["k"] for r in rows] == default_ks(8) == [1, 2, 4, 8]
    # Reference: the FFN's own forward with rule "topk" vs rule "all", on the inputs it sees at τ = 1.05.
    inputs = {}
    hooks = [f.register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, []).append(a[0]))
             for i, f in enumerate(prunepath.prunepath_modules(model))]
    with torch.no_grad():
        for s in range(0, 40, 16):
            model(input_ids=ids[s:s + 16][None])
    for h in hooks:
        h.remove()
    for row in rows:
        per_layer = []
        for i, f in enumerate(prunepath.prunepath_modules(model)):
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[i]])
            with torch.no_grad(), prunepath.routing(model, rule="all"):
                y_all = f(x)
            with torch.no_grad(), prunepath.routing(model, rule="topk", k=row["k"]):
                y_k = f(x)
            per_layer.append(float((y_k - y_all).pow(2).mean()))
        assert row["per_layer_mse"] == pytest.approx(per_layer, rel=1e-9, abs=1e-15)
        assert row["mse"] == pytest.approx(sum(per_layer) / len(per_layer), rel=1e-9, abs=1e-15)
    mses = [r["mse"] for r in rows]
    assert mses[-1] == pytest.approx(0, abs=1e-20) and mses[0] > 0
    with pytest.raises(PrunePathError, match="between 1 and"):
        topk_reconstruction(model, None, ids, ks=[0, 3], progress=False)


def test_reports_and_plot(tmp_path):
    from prunepath.evaluation.plots import plot_frontier
    from prunepath.evaluation.reports import read_json, write_csv, write_json, write_markdown

    rows = [{"tau": 0.5, "s_ffn": 0.5, "ppl": 30.0, "tokens": 10, "active_hist": [[1, 2]]},
            {"tau": 1.05, "s_ffn": 0.0, "ppl": float("nan"), "tokens": 10}]
    write_json(tmp_path / "r.json", {"rows": rows, "dense": {"ppl": 20.0, "s_ffn": 0.0, "model": "d"}})
    assert read_json(tmp_path / "r.json")["rows"][1]["ppl"] is None  # strict JSON
    write_csv(tmp_path / "r.csv", rows)
    assert (tmp_path / "r.csv").read_text().splitlines()[0] == "tau,s_ffn,ppl,tokens"
    write_markdown(tmp_path / "r.md", rows)
    assert "| τ | s_FFN | ppl | tokens |" in (tmp_path / "r.md").read_text()
    out = plot_frontier([tmp_path / "r.json", rows], tmp_path / "f.png", "ppl")
    assert out.stat().st_size > 1000 and not list(tmp_path.glob(".*"))  # no temp files left
    with pytest.raises(PrunePathError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        plot_frontier([tmp_path / "bad.json"], tmp_path / "g.png")


def test_nearest_sparsity_picks_the_closest_row():
    from prunepath.evaluation.sweep import nearest_sparsity

    rows = [{"s_ffn": s, "tau": t} for s, t in ((0.0, 1.05), (0.31, 0.8), (0.52, 0.6), (0.7, 0.4))]
    assert nearest_sparsity(rows, 0.5)["tau"] == 0.6
    assert nearest_sparsity(rows, 0.33)["tau"] == 0.8
    assert nearest_sparsity(rows, 0.9)["tau"] == 0.4
    assert nearest_sparsity([], 0.5) is None


def test_pareto_front_equals_brute_force():
    from prunepath.evaluation.sweep import pareto_front
    g = torch.Generator().manual_seed(7)
    for _ in range(20):
        rows = [{"s_ffn": float(s), "ppl": float(p)} for s, p in torch.rand(30, 2, generator=g).tolist()]
        rows.append({"s_ffn": 0.5, "ppl": float("nan")})  # ignored
        front = pareto_front(rows)
        brute = sorted((r for r in rows[:-1] if not any(o is not r and o["s_ffn"] >= r["s_ffn"] and
                                                        o["ppl"] <= r["ppl"] for o in rows[:-1])),
                       key=lambda r: r["s_ffn"])
        assert front == brute
