"""The LM study driver (prunepath.pipeline.lm_study) end to end on a tiny random Llama: every job kind runs,
records carry the documented fields, an interrupted run resumes without redoing finished work, shards partition
the jobs."""

import json

import pytest
import yaml

from prunepath import PrunePathError
from prunepath.pipeline import lm_study
from test_eval_fixtures import random_text, save_tiny_llama

REQUIRED = {"method", "s_ffn", "ppl", "tau", "eval_tokens", "train_tokens", "model", "seed"}
METHODS = {"dense", "dense-finetuned", "prunepath-sweep", "prunepath", "lte", "moefication-topk", "d2dmoe",
           "wanda", "static"}


@pytest.fixture
def study(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "tiny")
    valid = tmp_path / "valid.txt"
    valid.write_text(random_text(700, seed=1))
    train = tmp_path / "train.txt"
    train.write_text("\n\n".join(random_text(200, seed=s) for s in range(2, 14)))
    xsum = tmp_path / "xsum.jsonl"
    xsum.write_text("".join(json.dumps({"id": str(i), "document": random_text(40, seed=20 + i),
                                        "summary": random_text(6, seed=40 + i)}) + "\n" for i in range(3)))
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": random_text(8, seed=60 + i), "input": "",
                                   "output": random_text(10, seed=80 + i)} for i in range(6)]))
    recipe = {
        "study": "lm", "name": "study-lm-tiny", "model": str(model_dir), "out": str(tmp_path / "out"),
        "train_tokens": 4 * 2 * 32,
        "train": {"data": str(train), "seq_len": 32, "batch_size": 2, "precision": "fp32", "neurons_per_expert": 8,
                  "max_eval_tokens": 64, "save_every": 1, "calib_tokens": 64},
        "variants": {"main": {"label": "warmstart+offset", "tau_min": 0.6, "gate_offset": 4.0,
                              "warmstart_steps": 3},
                     "paper": {"label": "paper-defaults", "recipe": "recipes/paper-defaults.yaml", "tau_min": 0.6}},
        "tau_min_runs": [0.8],
        "lte": {"method_params": {"eta": 0.5}},
        "evaluation": {"data": str(valid), "max_tokens": 256, "window": 64, "batch_size": 4},
        "sweep_taus": [1.05, 0.8, 0.5],
        "baselines": {"calib": str(train), "calib_tokens": 128, "calib_seq_len": 32, "fit_steps": 3, "fit_batch": 32,
                      "targets": [0.3, 0.6], "wanda": [0.5]},
        "generation": {"xsum": str(xsum), "xsum_docs": 3, "batch_size": 2, "max_new_tokens": 4, "alpaca": str(alpaca),
                       "alpaca_examples": 4, "alpaca_generations": 1, "targets": [0.3, 0.6],
                       "max_input_tokens": 48},
        "topk": {"max_tokens": 64}, "density": {"targets": [0.5]}, "min_job_s": 0, "save_margin_s": 0,
        "device": "cpu",
    }
    return tmp_path, recipe


@pytest.mark.parametrize("gen_run", ["main", "paper"])
def test_shards_partition_the_jobs_and_keep_chains_together(gen_run):
    cfg = lm_study.load_study({"study": "lm", "variants": {"main": {}, "paper": {}}, "tau_min_runs": [0.8, 0.45],
                               "generation": {"run": gen_run}})
    jobs = lm_study.build_jobs(cfg)
    gen = [j for j in jobs if j.id.startswith("gen-")]
    assert all(j.deps == [f"eval-{gen_run}"] for j in gen) and len(gen) == 2  # generation follows its checkpoint
    ids = [j.id for j in jobs]
    assert len(ids) == len(set(ids))
    for n in (1, 2, 3, 6, 10):
        parts = [lm_study.shard_jobs(jobs, i, n) for i in range(n)]
        got = sorted(j.id for p in parts for j in p)
        assert got == sorted(ids)  # every job exactly once
        for p in parts:
            mine = {j.id for j in p}
            for j in p:
                assert set(j.deps) <= mine  # dependencies run in the same process, before
                assert all(ids.index(d) < ids.index(j.id) for d in j.deps)
    with pytest.raises(PrunePathError, match="shard"):
        lm_study.parse_shard("2/2")
    with pytest.raises(PrunePathError, match="generation.run"):
        lm_study.load_study({"study": "lm", "variants": {"main": {}}, "generation": {"run": "taumin-0.8"}})


def test_train_config_splits_the_budget(study):
    _, recipe = study
    cfg = lm_study.load_study(recipe)
    for run in ("dense-ft", "main", "lte", "paper", "taumin-0.8"):
        tc = lm_study.train_config(cfg, run, "cpu")
        assert tc.total_steps * tc.tokens_per_step == 256, run
    assert lm_study.train_config(cfg, "taumin-0.8", "cpu").tau_min == 0.8
    paper = lm_study.train_config(cfg, "paper", "cpu")
    assert paper.gate_offset == 0.0 and paper.warmstart_steps == 0 and paper.tau_min == 0.6
    main = lm_study.train_config(cfg, "main", "cpu")
    assert main.gate_offset == 4.0 and main.warmstart_steps == 3
    with pytest.raises(PrunePathError, match="never trains on WikiText"):
        lm_study.load_study({**recipe, "train": {"data": "wikitext-2/wiki.valid.raw"}})
    with pytest.raises(PrunePathError, match="unknown key"):
        lm_study.load_study({**recipe, "bogus": 1})


def test_study_runs_every_job_resumes_and_merges(study, monkeypatch):
    tmp, recipe = study
    out = tmp / "out"
    # 1) a deadline hit in the middle of the first training: checkpointed, nothing else started
    real_left = lm_study.Context.left
    log_file = out / "ckpt" / "dense-ft" / "train_log.jsonl"

    def left(self):  # the deadline passes after the second training step of dense-ft
        return -1.0 if log_file.exists() and len(log_file.read_text().splitlines()) >= 2 else 1e9

    monkeypatch.setattr(lm_study.Context, "left", left)
    first = lm_study.run(recipe, progress=False, shard="0/2")
    assert first["stopped"] and "dense" in first["ran"]
    assert any("train-dense-ft" in x for x in first["left"])
    assert list((out / "ckpt" / "dense-ft" / "checkpoints").iterdir())  # stopped with a checkpoint
    assert not (out / "jobs" / "train-dense-ft.json").exists()
    monkeypatch.setattr(lm_study.Context, "left", real_left)
    # resuming with another budget is refused by name (the schedule would not match the checkpoint)
    other = lm_study.load_study({**recipe, "train_tokens": 512})
    job = next(j for j in lm_study.build_jobs(other) if j.id == "train-dense-ft")
    with pytest.raises(PrunePathError, match="same --train-tokens"):
        lm_study.job_train(lm_study.Context(other, out, "cpu", None, False), job)

    # 2) the same command again finishes shard 0 without repeating the dense evaluation
    import prunepath.evaluation.perplexity as ppl_mod

    real_eval = ppl_mod.evaluate_perplexity
    dense_before = json.loads((out / "jobs" / "dense.json").read_text())
    second = lm_study.run(recipe, progress=False, shard="0/2")
    assert "dense" not in second["ran"] and "train-dense-ft" in second["ran"] and not second["stopped"]
    assert json.loads((out / "jobs" / "dense.json").read_text()) == dense_before
    log = [json.loads(x) for x in (out / "ckpt" / "dense-ft" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 5))  # resumed, no step twice
    # 3) shard 1, then a merge-only call; generation prompts (XSum and Alpaca) go through _prompt_ids, which
    # applies the chat template when the tokenizer has one
    import prunepath.evaluation.generation as gen_mod

    prompted = []
    real_prompt_ids = gen_mod._prompt_ids
    monkeypatch.setattr(gen_mod, "_prompt_ids", lambda tok, ex, *a: prompted.append(ex) or real_prompt_ids(tok, ex, *a))
    lm_study.run(recipe, progress=False, shard="1/2", do_merge=False)
    assert any("document" in ex for ex in prompted)  # XSum
    assert any("document" not in ex and ex.get("response") for ex in prompted)  # Alpaca generations
    monkeypatch.setattr(gen_mod, "_prompt_ids", real_prompt_ids)
    merged = lm_study.run(recipe, progress=False, merge_only=True)["merged"]
    assert merged["left"] == []
    res = out / "results"
    rows = json.loads((res / "lm-tiny.json").read_text())
    assert {r["method"] for r in rows} == METHODS
    for r in rows:
        assert REQUIRED <= set(r), r["method"]
        assert r["ppl"] > 1 and 0 <= r["s_ffn"] < 1
        assert not any(k.startswith("_") for k in r)
        if r["method"] not in ("dense",):
            assert r["train_tokens"] == 256, r["method"]
    sweep = [r for r in rows if r["method"] == "prunepath-sweep" and r["variant"] == "warmstart+offset"]
    assert {r["tau"] for r in sweep} >= {1.05, 0.8, 0.5}
    assert any(r["method"] == "prunepath-sweep" and r["variant"] == "paper-defaults" for r in rows)
    assert {r["tau_min"] for r in rows if r["method"] == "prunepath"} == {0.6, 0.8}
    assert [r["s_ffn"] for r in sorted(sweep, key=lambda r: -r["tau"])][0] == 0.0
    topk = json.loads((res / "topk-tiny.json").read_text())
    assert {t["router"] for t in topk} == {"prunepath", "lte", "moefication"}
    assert all("error" not in t for t in topk)
    dens = json.loads((res / "density-profile-tiny.json").read_text())
    assert dens["num_experts"] == 8 and len(dens["layers"]) == 2
    assert sum(dens["layers"][0]["counts"].values()) == dens["tokens"]
    preds = [json.loads(x) for x in (res / "gen-tiny-predictions.jsonl").read_text().splitlines()]
    assert {p["system"] for p in preds} >= {"dense"} and len({p["system"] for p in preds}) >= 2
    gen = json.loads((res / "gen-tiny-raw.json").read_text())
    assert gen["alpaca"]["systems"][0]["system"] == "dense" and gen["alpaca"]["systems"][0]["generations"]
    # 4) a sweep cut short (2 points done, the 3rd half-written) redoes only the missing points
    part = out / "partial" / "eval-main.jsonl"
    lines = part.read_text().splitlines()
    part.write_text("\n".join(lines[:2]) + "\n" + lines[2][:30])
    (out / "jobs" / "eval-main.json").unlink()
    calls = []
    monkeypatch.setattr(ppl_mod, "evaluate_perplexity", lambda *a, **k: calls.append(1) or real_eval(*a, **k))
    redo = lm_study.run(recipe, progress=False)
    assert redo["ran"] == ["eval-main"] and len(calls) == len(lines) - 2
    assert len((out / "partial" / "eval-main.jsonl").read_text().splitlines()) == len(lines)
    # 5) nothing is redone on a further run
    monkeypatch.setattr(ppl_mod, "evaluate_perplexity", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    again = lm_study.run(recipe, progress=False)
    assert again["ran"] == [] and again["left"] == []
    monkeypatch.setattr(ppl_mod, "evaluate_perplexity", real_eval)
    # 6) generation checks the deadline between batches of documents: it stops inside a system instead of overrunning,
    # leaves no job file, and the next run redoes it
    (out / "jobs" / "gen-xsum.json").unlink()
    (out / "partial" / "gen-xsum.jsonl").unlink()
    monkeypatch.setattr(lm_study.Context, "left", lambda self: 1e-9)  # any time a document has taken is too much
    cut = lm_study.run(recipe, progress=False, do_merge=False)
    assert cut["stopped"] and cut["ran"] == [] and not (out / "jobs" / "gen-xsum.json").exists()
    monkeypatch.setattr(lm_study.Context, "left", real_left)
    assert lm_study.run(recipe, progress=False)["ran"] == ["gen-xsum"]


def test_cli_dispatches_study_recipes(study, monkeypatch, tmp_path):
    from prunepath.cli.main import main

    _, recipe = study
    seen = {}

    def fake(raw, **kw):
        seen.update(raw=raw, **kw)
        return {"summary": "ok"}

    monkeypatch.setattr(lm_study, "run", fake)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--device", "cpu", "--shard", "1/2", "--train-tokens", "99",
                 "--deadline-s", "60", "--no-merge"]) == 0
    assert seen["shard"] == "1/2" and seen["train_tokens"] == 99 and seen["device"] == "cpu"
    assert seen["do_merge"] is False and seen["deadline"] > 0
    import sys
    import types

    nlu = types.ModuleType("prunepath.pipeline.nlu_study")
    nlu.run = lambda raw, *, progress=True, deadline=None: {"summary": f"nlu {raw['name']}"}
    monkeypatch.setitem(sys.modules, "prunepath.pipeline.nlu_study", nlu)
    import prunepath.pipeline as pp

    monkeypatch.setattr(pp, "nlu_study", nlu, raising=False)
    p2 = tmp_path / "n.yaml"
    p2.write_text(yaml.safe_dump({"study": "nlu", "name": "nlu-x"}))
    assert main(["run", str(p2)]) == 0


def test_a_failing_job_does_not_stop_independent_ones(tmp_path):
    cfg = lm_study.load_study({"study": "lm", "min_job_s": 0})

    def boom(ctx, job):
        raise ValueError("broken")

    def ok(ctx, job):
        return {"records": [{"method": "dense", "ppl": 2.0}]}

    jobs = [lm_study.Job("a", "A", boom), lm_study.Job("b", "A", ok), lm_study.Job("c", "A", ok, ["a"])]
    ctx = lm_study.Context(cfg, tmp_path, "cpu", None, False)
    res = lm_study.run_jobs(ctx, jobs)
    assert res["ran"] == ["b"] and res["failed"] == ["a"] and res["stopped"] is None
    assert any(x.startswith("c (waits for a)") for x in res["left"])
    assert "broken" in (tmp_path / "failed" / "a.txt").read_text()
    assert ctx.done("b") and not ctx.done("a")


def test_study_recipe_has_the_distillation_variant():
    from pathlib import Path

    recipe = yaml.safe_load((Path(__file__).resolve().parents[2] / "recipes" / "study-lm-smollm2.yaml").read_text())
    cfg = lm_study.load_study(recipe)
    main, dist = lm_study.train_config(cfg, "main", "cpu"), lm_study.train_config(cfg, "distill", "cpu")
    assert main.distill == 0.0 and dist.distill == 0.8
    same = ("gate_offset", "warmstart_steps", "tau_min", "stage1_steps", "stage2_steps", "data", "batch_size")
    assert all(getattr(main, k) == getattr(dist, k) for k in same)  # only the distillation differs
    jobs = lm_study.build_jobs(cfg)
    ids = [j.id for j in jobs]
    assert ids.index("train-distill") < ids.index("eval-distill")
    # More variants than single-letter chains: each still gets its own chain, shared by its train and eval jobs.
    chain = {j.id: j.chain for j in jobs}
    variants = [v for v in cfg["variants"] if v != "main"]
    assert len(variants) > 13
    assert all(chain[f"train-{v}"] == chain[f"eval-{v}"] for v in variants)
    assert len({chain[f"train-{v}"] for v in variants}) == len(variants)
    r5 = lm_study.train_config(cfg, "r5-sample-n16", "cpu")
    assert (r5.tau_schedule, r5.neurons_per_expert, r5.train_scope) == ("sample", 16, "all")
    r7 = lm_study.train_config(cfg, "r7-split-n16", "cpu")  # evaluation keys do not reach the trainer
    assert (r7.inner_mid_bias, r7.inner_sparsity_max, r7.stage1_steps + r7.stage2_steps) == (0.15, 0.6, 1221)
    assert r7.gates and not lm_study.train_config(cfg, "r8-split-n16-nogates", "cpu").gates


def test_round4_jobs_original_base_selection_and_budgets(study):
    """Round 4: pruning / router baselines start from the original model (no dense-ft dependency), TEAL / CATS
    and per-layer allocation are jobs, a variant may set its own token budget, --jobs selects by wildcard."""
    tmp, recipe = study
    recipe = {**recipe, "baselines": {**recipe["baselines"], "base": "original"},
              "variants": {**recipe["variants"], "big": {"label": "big", "tau_min": 0.6, "train_tokens": 512}},
              "activation": {"methods": ["teal", "cats"], "targets": [0.3, 0.5], "calib_tokens": 128},
              "allocation": {"runs": ["big"], "targets": [0.4], "calib_tokens": 128}}
    cfg = lm_study.load_study(recipe)
    jobs = {j.id: j for j in lm_study.build_jobs(cfg)}
    for b in ("wanda", "moefication", "d2dmoe", "static"):
        assert jobs[b].deps == [] and jobs[b].chain != jobs["train-dense-ft"].chain
    assert jobs["alloc-big"].deps == ["train-big"] and jobs["alloc-big"].chain == jobs["train-big"].chain
    assert {"teal", "cats"} <= set(jobs)
    big = lm_study.train_config(cfg, "big", "cpu")
    assert big.total_steps * big.tokens_per_step == 512
    assert lm_study.train_config(cfg, "main", "cpu").total_steps * big.tokens_per_step == 256
    picked = lm_study.select_jobs(list(jobs.values()), ["teal", "*-big", "wanda"])
    assert [j.id for j in picked] == [j for j in jobs if j in ("teal", "train-big", "eval-big", "alloc-big", "wanda")]
    with pytest.raises(PrunePathError, match="no job matches"):
        lm_study.select_jobs(list(jobs.values()), ["nope*"])
    for bad, msg in (({"activation": {"methods": ["tael"]}}, "activation.methods"),
                     ({"allocation": {"runs": ["ghost"]}}, "allocation.runs"),
                     ({"baselines": {"base": "finetuned"}}, "baselines.base")):
        with pytest.raises(PrunePathError, match=msg):
            lm_study.load_study({**recipe, **bad})

    result = lm_study.run(recipe, progress=False,
                          jobs=["dense", "teal", "cats", "wanda", "moefication", "d2dmoe", "static", "*-big"])
    assert not result["failed"], result["left"]
    rows = json.loads((tmp / "out" / "results" / "lm-tiny.json").read_text())
    by = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    dense = by["dense"][0]
    for m in ("teal", "cats"):
        assert [r["target_s_ffn"] for r in by[m]] == [0.3, 0.5]
        assert all(r["eval_tokens"] == dense["eval_tokens"] and 0.15 < r["s_ffn"] < 0.65 for r in by[m])
    assert by["wanda"][0]["variant"] == "on original" and by["wanda"][0]["train_tokens"] == 0
    for m in ("moefication-topk", "d2dmoe", "static"):
        assert by[m] and all(r["variant"].endswith("original") for r in by[m]), m
    sweep = by["prunepath-sweep"]
    assert all(r["neurons_per_expert"] == 8 and 0 < r["router_bytes_frac"] < 0.2 for r in sweep)
    assert sweep[0]["train_tokens"] == 512
    alloc = by["prunepath-alloc"]
    assert len(alloc) == 1 and abs(alloc[0]["s_ffn_calibration"] - 0.4) <= 0.05 and alloc[0]["layer_tau"]
    assert "train-dense-ft" not in result["ran"]  # not selected, never started


def test_inner_variant_trains_with_thresholds_and_evaluates_its_grid(study):
    """A variant with inner_sparsity_max trains with in-expert thresholds; inner_targets × inner_taus is evaluated
    with thresholds calibrated on the calibration text; the frontier is the grid's (and τ sweep's) Pareto front."""
    tmp, recipe = study
    recipe = {**recipe, "sweep_taus": [1.05, 0.7],
              "variants": {**recipe["variants"], "hyb": {"label": "hybrid", "tau_min": 0.6, "tau_schedule": "sample",
                                                         "inner_sparsity_max": 0.5, "inner_targets": [0.2, 0.5],
                                                         "inner_taus": [1.05, 0.8], "inner_mid_bias": 0.2,
                                                         "inner_allocations": ["uniform", "block"]}}}
    cfg = lm_study.load_study(recipe)
    assert lm_study.train_config(cfg, "hyb", "cpu").inner_sparsity_max == 0.5
    for bad in ({"inner_targets": [1.2]}, {"inner_taus": [0]}, {"inner_allocations": ["greedy"]}):
        with pytest.raises(PrunePathError, match="variants.hyb.inner"):
            lm_study.load_study({**recipe, "variants": {**recipe["variants"], "hyb": {**recipe["variants"]["hyb"],
                                                                                        **bad}}})
    result = lm_study.run(recipe, progress=False, jobs=["*-hyb"])
    assert not result["failed"], result["left"]
    rows = json.loads((tmp / "out" / "results" / "lm-tiny.json").read_text())
    grid = [r for r in rows if r["method"] == "prunepath-inner-grid"]
    points = [(t, f, a) for t in (0.8, 1.05) for f in (0.2, 0.5) for a in ("block", "uniform")]
    assert sorted((r["tau"], r["inner_target"], r["inner_allocation"]) for r in grid) == points
    uniform = [r for r in grid if r["inner_allocation"] == "uniform"]
    assert all(r["inner_f_in"][0] < r["inner_target"] < r["inner_f_mid"][0] for r in uniform)  # the trained bias
    dense_f = {r["inner_target"]: r for r in uniform if r["tau"] == 1.05}
    assert 0.1 < dense_f[0.2]["s_ffn"] < dense_f[0.5]["s_ffn"] < 0.65 and dense_f[0.5]["s_experts"] == 0.0
    sweep = [r for r in rows if r["method"] == "prunepath-sweep"]
    front = sorted((r for r in rows if r["method"] == "prunepath-inner"), key=lambda r: r["s_ffn"])
    cloud = grid + sweep
    for r in cloud:  # nothing in the cloud beats a front point on both axes; every non-front point is beaten
        on_front = any(f["s_ffn"] == r["s_ffn"] and f["ppl"] == r["ppl"] for f in front)
        beaten = any(o["s_ffn"] >= r["s_ffn"] and o["ppl"] < r["ppl"] for o in cloud)
        assert on_front != beaten or (on_front and not beaten)
    assert all(a["ppl"] < b["ppl"] for a, b in zip(front, front[1:]))
