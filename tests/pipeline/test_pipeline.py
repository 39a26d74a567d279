"""`prunepath run`: a recipe end to end on a tiny local model, resumable, with clear errors."""

import json

import pytest
import yaml

import prunepath
from prunepath import PrunePathError
from prunepath.cli.main import main
from prunepath.pipeline import load_run_recipe, run_recipe
from test_eval_fixtures import random_text, save_tiny_llama


@pytest.fixture
def setup(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "tiny")
    data = tmp_path / "valid.txt"
    data.write_text(random_text(900, seed=1))
    train_text = tmp_path / "train.txt"
    train_text.write_text("\n\n".join(random_text(300, seed=s) for s in range(2, 8)))
    return tmp_path, model_dir, data, train_text


def write_recipe(path, **body):
    path.write_text(yaml.safe_dump(body))
    return path


def test_untrained_run_writes_results_and_resumes(setup, monkeypatch):
    tmp, model_dir, data, _ = setup
    recipe = write_recipe(tmp / "r.yaml", name="t", model=str(model_dir), out=str(tmp / "out"),
                          convert={"neurons_per_expert": 8},
                          evaluation={"task": "ppl", "data": str(data), "window": 64},
                          sweep={"taus": [1.05, 0.8, 0.5, 0.2], "dense": True})
    result = run_recipe(load_run_recipe(recipe), progress=False)
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["dense"] + ["prunepath-untrained"] * 4
    sweep = rows[1:]
    assert [r["tau"] for r in sweep] == [1.05, 0.8, 0.5, 0.2]
    s = [r["s_ffn"] for r in sweep]
    assert s[0] == 0 and all(b >= a for a, b in zip(s, s[1:])) and s[-1] > 0
    out = tmp / "out"
    for name in ("results.json", "results.csv", "results.md", "frontier.png", "summary.md", "dense.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(rows))
    assert prunepath.load(out / "model")[0].prunepath.config.num_experts == 8
    # A re-run reuses every finished step: no evaluation is repeated.
    import prunepath.evaluation.perplexity as ppl_mod

    def boom(*a, **k):
        raise AssertionError("evaluation repeated on resume")

    monkeypatch.setattr(ppl_mod, "evaluate_perplexity", boom)
    again = run_recipe(load_run_recipe(recipe), progress=False)
    assert [r["ppl"] for r in again["rows"]] == [r["ppl"] for r in rows]


def test_interrupted_sweep_continues_where_it_stopped(setup):
    tmp, model_dir, data, _ = setup
    body = dict(name="t", model=str(model_dir), out=str(tmp / "out"), convert={"neurons_per_expert": 8},
                evaluation={"task": "ppl", "data": str(data), "window": 64}, sweep={"taus": [1.05, 0.5]})
    run_recipe(load_run_recipe(write_recipe(tmp / "a.yaml", **body)), progress=False)
    lines = (tmp / "out" / "sweep.jsonl").read_text().splitlines()
    # Simulate a crash in the middle of writing the second row.
    (tmp / "out" / "sweep.jsonl").write_text(lines[0] + "\n" + lines[1][:20])
    result = run_recipe(load_run_recipe(write_recipe(tmp / "a.yaml", **body)), progress=False)
    assert [r["tau"] for r in result["rows"][1:]] == [1.05, 0.5]


def test_run_with_training(setup, capsys):
    tmp, model_dir, data, train_text = setup
    recipe = write_recipe(
        tmp / "r.yaml", name="t", model=str(model_dir), out=str(tmp / "out"), convert={"neurons_per_expert": 8},
        train={"task": "lm", "data": str(train_text), "stage1_steps": 2, "stage2_steps": 2, "tau_min": 0.5,
               "seq_len": 32, "batch_size": 2, "device": "cpu", "progress": False, "max_eval_tokens": 64},
        evaluation={"task": "ppl", "data": str(data), "window": 64}, sweep={"taus": [1.05, 0.5]})
    assert main(["run", str(recipe), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "original model (dense) PPL" in out and "PrunePath PPL at s_FFN" in out
    assert "x the original" in out
    rows = json.loads((tmp / "out" / "results.json").read_text())
    assert rows[1]["method"] == "prunepath-sweep" and rows[1]["train_tokens"] > 0
    assert (tmp / "out" / "model" / "prunepath_config.json").exists()


def test_run_with_teal_curve_on_the_original_model(setup, monkeypatch):
    """sweep.teal: TEAL on the untouched original model at each target, on the same tokens, before conversion;
    its rows join the results and the plot, the summary compares at equal s_FFN, and a re-run reuses them."""
    tmp, model_dir, data, train_text = setup
    recipe = write_recipe(
        tmp / "r.yaml", name="t", model=str(model_dir), out=str(tmp / "out"), convert={"neurons_per_expert": 8},
        evaluation={"task": "ppl", "data": str(data), "window": 64},
        train={"task": "lm", "data": str(train_text), "stage1_steps": 1, "stage2_steps": 1, "tau_min": 0.5,
               "seq_len": 32, "batch_size": 2, "device": "cpu", "progress": False, "max_eval_tokens": 64},
        sweep={"taus": [1.05, 0.7, 0.4], "teal": [0.2, 0.5], "teal_calib_tokens": 128,
               "summary_sparsities": [0.3]})
    result = run_recipe(load_run_recipe(recipe), progress=False)
    teal = [r for r in result["rows"] if r["method"] == "teal"]
    dense = next(r for r in result["rows"] if r["method"] == "dense")
    assert [r["target_s_ffn"] for r in teal] == [0.2, 0.5]
    assert 0.1 < teal[0]["s_ffn"] < teal[1]["s_ffn"] < 0.7  # measured, close to the targets
    assert all(r["eval_tokens"] == dense["eval_tokens"] for r in teal)
    assert teal[1]["ppl"] != dense["ppl"]  # the sparsity changes the outputs (a random model: either way)
    # the conversion / training started from the original weights (TEAL's wrappers were removed)
    model, _ = prunepath.load(tmp / "out" / "model")
    assert not any(type(m).__name__ == "ActivationSparseFFN" for m in model.modules())
    assert "x the original" in result["summary"]
    import prunepath.baselines.activation as act

    monkeypatch.setattr(act, "collect_activation_stats", lambda *a, **k: pytest.fail("TEAL recomputed"))
    again = run_recipe(load_run_recipe(recipe), progress=False)
    assert [r["ppl"] for r in again["rows"] if r["method"] == "teal"] == [r["ppl"] for r in teal]


@pytest.mark.parametrize("body,message", [
    (dict(name="x", bogus=1), "unknown recipe key"),
    (dict(name="x", sweep={"taus": [0.0, 0.5]}), "every τ must be in"),
    (dict(name="x", train={"tau_min": 1.2}), "tau-min must be in"),
    (dict(name="x", convert={"neurons": 3}), "unknown setting"),
    (dict(name="x", evaluation={"task": "rouge"}), "support evaluation task 'ppl'"),
    (dict(name="x", sweep={"taus": [1.05], "teal": [1.2]}), "sweep.teal"),
])
def test_bad_recipes(tmp_path, body, message):
    with pytest.raises(PrunePathError, match=message):
        load_run_recipe(write_recipe(tmp_path / "r.yaml", **body))


def test_missing_and_malformed_recipe(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "recipe not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(PrunePathError, match="not valid YAML"):
        load_run_recipe(bad)


def test_shipped_recipes_are_valid():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml")):
        text = yaml.safe_load(path.read_text())
        if "study" in text:  # study recipes (prunepath.pipeline.lm_study / nlu_study) are checked by their tests
            continue
        if "sweep" in text or "evaluation" in text:  # run recipes (the others are training recipes)
            load_run_recipe(path)
        else:
            from prunepath.training.config import TrainConfig
            TrainConfig.from_dict(text, where=str(path))
