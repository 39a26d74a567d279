"""The LM study (issue 7): PrunePath vs dense fine-tuning, LTE, MoEfication top-k, D2DMoE, Wanda and static expert
pruning on one model, one training text and one token budget, evaluated by the same perplexity code.

Driven by a recipe with ``study: lm`` (recipes/study-lm-smollm2.yaml) through ``prunepath run``. The work is a list
of *jobs* (train X, evaluate X over its knob, fit baseline Y, generation, ...) grouped in *chains* (a job only
depends on earlier jobs of its chain). ``--shard i/n`` runs the chains ``c`` with ``c mod n == i``, so several
processes (one or more per GPU) split the study without locks and without overlap; ``--merge-only`` then gathers
everything. Every job is resumable:

    OUT/jobs/<job>.json        a finished job (its records); a re-run skips it
    OUT/partial/<job>.jsonl    the rows a sweep has finished so far (a re-run continues after them)
    OUT/ckpt/<run>/            trainer output; an interrupted training resumes from its last checkpoint
    OUT/results/               merged: lm-<name>.json, topk-<name>.json, gen-<name>-predictions.jsonl, ...

A deadline (``deadline=`` epoch seconds) stops the driver cleanly: training saves a checkpoint and stops, a
sweep stops between two points, no job starts that cannot finish a first step; what is left is printed.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from pathlib import Path

from prunepath.errors import PrunePathError
from prunepath.evaluation.reports import atomic_write_text
from prunepath.evaluation.reports import write_json
from prunepath.routing.config import TAU_ALL, validate_sparsity_fraction, validate_tau
from prunepath.evaluation.inner import ALLOCATIONS as INNER_ALLOCATIONS
from prunepath.pipeline.jobs import run_jobs as engine_run_jobs
from prunepath.pipeline.lm_context import (  # noqa: F401  (re-exported: the study's names stay importable from here)
    STUDY_KEYS, _log, DeadlineReached, out_dir, train_config, Job, select_jobs, chains_of, shard_jobs,
    parse_shard, Context, ACTIVATION_JOBS)
from prunepath.pipeline.lm_jobs import (  # noqa: F401  (re-exported)
    job_dense, job_train, _small, job_eval_dense_ft, _sweep, _strip, _variant_label, job_eval_prunepath,
    _structure, _density, _topk, _calib_inputs, job_eval_lte, _base_model, job_wanda, _converted_base,
    job_router_baseline, job_static, job_activation, job_allocation, _gen_taus, _systems, job_gen_xsum,
    job_gen_alpaca)


def load_study(recipe: dict, *, overrides: dict | None = None) -> dict:
    """The study settings with defaults filled in; unknown keys are rejected by name."""
    cfg = copy.deepcopy(recipe)
    cfg.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(cfg) - STUDY_KEYS - {"source"})
    if unknown:
        raise PrunePathError(f"study recipe: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(STUDY_KEYS))}")
    if cfg.get("study") != "lm":
        raise PrunePathError(f"lm_study runs recipes with `study: lm` (got {cfg.get('study')!r})")
    cfg.setdefault("name", "study-lm")
    cfg.setdefault("model", "smollm2-135m")
    cfg.setdefault("seed", 0)
    cfg.setdefault("train_tokens", 10_000_000)
    cfg.setdefault("stage1_fraction", 0.5)
    cfg.setdefault("device", "auto")
    cfg.setdefault("min_job_s", 20)
    cfg["train"] = {"task": "lm", "data": "mix:sotu,moby-dick,austen,brown", "seq_len": 512, "batch_size": 8,
                    "grad_accum": 1, "precision": "fp32", "neurons_per_expert": 32, "max_eval_tokens": 4096,
                    "save_every": 50, **(cfg.get("train") or {})}
    if str(cfg["train"].get("data", "")).startswith("wikitext") or "wiki." in str(cfg["train"].get("data", "")):
        raise PrunePathError("the study never trains on WikiText (it is the evaluation text); use registry corpora")
    cfg["variants"] = cfg.get("variants") or {"main": {"label": "warmstart+offset", "tau_min": 0.6,
                                                       "gate_offset": 4.0, "warmstart_steps": 200}}
    if "main" not in cfg["variants"]:
        raise PrunePathError("study recipe: variants must include `main` (the best PrunePath setting)")
    cfg.setdefault("tau_min_runs", [])
    cfg["lte"] = {"method_params": {"eta": 0.5}, **(cfg.get("lte") or {})}
    cfg["evaluation"] = {"data": "wikitext-2/wiki.valid.raw", "max_tokens": 131072, "window": 512,
                         "batch_size": 16, **(cfg.get("evaluation") or {})}
    cfg.setdefault("sweep_taus", [TAU_ALL, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4])
    cfg.setdefault("near_tau", [-0.05, 0.0, 0.05])
    cfg["baselines"] = {"calib": cfg["train"]["data"], "calib_tokens": 32768, "calib_seq_len": 256, "fit_steps": 200, "fit_batch": 1024,
                        "fit_lr": 3e-3, "targets": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                        "wanda": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8], **(cfg.get("baselines") or {})}
    cfg["generation"] = {"xsum": "xsum-sample/xsum_sample.jsonl", "xsum_docs": 64, "max_new_tokens": 48,
                         "alpaca": "alpaca-sample/alpaca_data_1k.json", "alpaca_examples": 200,
                         "alpaca_generations": 3, "targets": [0.3, 0.5, 0.7], "max_input_tokens": 768,
                         "run": "main", **(cfg.get("generation") or {})}
    if cfg["generation"]["run"] != "main" and cfg["generation"]["run"] not in cfg["variants"]:
        raise PrunePathError(f"generation.run must be main or a swept variant ({', '.join(cfg['variants'])}); "
                             f"got {cfg['generation']['run']!r}")
    cfg["topk"] = {"max_tokens": 4096, **(cfg.get("topk") or {})}
    # Baselines that start from a dense model prune / route the original model (``base: original``, the
    # reference users compare with) or the dense model fine-tuned on the training text (``dense-ft``).
    cfg["baselines"].setdefault("base", "dense-ft")
    if cfg["baselines"]["base"] not in ("original", "dense-ft"):
        raise PrunePathError(f"baselines.base must be original or dense-ft (got {cfg['baselines']['base']!r})")
    # Training-free activation sparsity (TEAL, CATS) on the original model, calibrated on baselines.calib text.
    cfg["activation"] = {"methods": [], "targets": [0.2, 0.3, 0.4, 0.5, 0.6], "calib_tokens": 16384,
                         **(cfg.get("activation") or {})}
    for m in cfg["activation"]["methods"]:
        if m not in ACTIVATION_JOBS:
            raise PrunePathError(f"activation.methods: unknown {m!r}; known: {', '.join(ACTIVATION_JOBS)}")
    # Per-layer budgets chosen on calibration text for trained checkpoints (``runs``), at global targets.
    cfg["allocation"] = {"runs": [], "targets": [0.3, 0.4, 0.5, 0.6], "method": "greedy", "calib_tokens": 16384,
                         **(cfg.get("allocation") or {})}
    for r in cfg["allocation"]["runs"]:
        if r != "main" and r not in cfg["variants"]:
            raise PrunePathError(f"allocation.runs: {r!r} is not a variant ({', '.join(cfg['variants'])})")
    for v, var in cfg["variants"].items():
        if "train_tokens" in var and int(var["train_tokens"]) < 1:
            raise PrunePathError(f"variants.{v}.train_tokens must be >= 1")
        for f in var.get("inner_targets") or []:
            validate_sparsity_fraction(f, f"variants.{v}.inner_targets")
        for t in var.get("inner_taus") or []:
            validate_tau(t, TAU_ALL, message=f"variants.{v}.inner_taus: every τ must be in (0, {TAU_ALL}] (got {t})")
        for a in var.get("inner_allocations") or []:
            if a not in INNER_ALLOCATIONS:
                raise PrunePathError(f"variants.{v}.inner_allocations: unknown {a!r}; choose from "
                                     f"{', '.join(INNER_ALLOCATIONS)}")
    cfg["density"] = {"targets": [0.5, 0.7], **(cfg.get("density") or {})}
    for t in cfg["sweep_taus"]:
        validate_tau(t, TAU_ALL, message=f"sweep_taus: every τ must be in (0, {TAU_ALL}] (got {t})")
    if int(cfg["train_tokens"]) < 1:
        raise PrunePathError("train_tokens must be >= 1")
    return cfg


def build_jobs(cfg: dict) -> list[Job]:
    """Every job of the study, in priority order (most important results first; deps before dependants)."""
    original = cfg["baselines"]["base"] == "original"
    base_chain, base_deps = ("S", []) if original else ("A", ["train-dense-ft"])
    jobs = [Job("dense", "A", job_dense),
            Job("train-dense-ft", "A", job_train, args={"run": "dense-ft"}),
            Job("train-main", "B", job_train, args={"run": "main"}),
            Job("train-lte", "C", job_train, args={"run": "lte"}),
            Job("eval-dense-ft", "A", job_eval_dense_ft, ["train-dense-ft"]),
            Job("eval-main", "B", job_eval_prunepath, ["train-main"], {"run": "main", "sweep": True}),
            Job("eval-lte", "C", job_eval_lte, ["train-lte"]),
            Job("wanda", base_chain, job_wanda, base_deps),
            Job("moefication", base_chain, job_router_baseline, base_deps, {"method": "moefication"})]
    jobs += [Job(m, "T", job_activation, args={"method": m}) for m in cfg["activation"]["methods"]]
    chains = itertools.chain("DEFGHIJKLMNOP", (f"X{i}" for i in itertools.count()))
    extra = [(name, True) for name in cfg["variants"] if name != "main"]  # ablations: swept like main
    extra += [(f"taumin-{float(t):g}", False) for t in cfg["tau_min_runs"]]  # evaluated at τ_min and near it
    for run, sweep in extra:
        c = next(chains)
        jobs += [Job(f"train-{run}", c, job_train, args={"run": run}),
                 Job(f"eval-{run}", c, job_eval_prunepath, [f"train-{run}"], {"run": run, "sweep": sweep})]
    for run in cfg["allocation"]["runs"]:
        c = next(j.chain for j in jobs if j.id == f"eval-{run}")
        jobs.append(Job(f"alloc-{run}", c, job_allocation, [f"train-{run}"], {"run": run}))
    gen_eval = f"eval-{cfg['generation'].get('run', 'main')}"  # generation follows its checkpoint's chain
    gen_chain = next(j.chain for j in jobs if j.id == gen_eval)
    jobs += [Job("d2dmoe", base_chain, job_router_baseline, base_deps, {"method": "d2dmoe"}),
             Job("static", base_chain, job_static, base_deps),
             Job("gen-xsum", gen_chain, job_gen_xsum, [gen_eval]),
             Job("gen-alpaca", gen_chain, job_gen_alpaca, [gen_eval])]
    return jobs


def run_jobs(ctx: Context, jobs: list[Job]) -> dict:
    """Run ``jobs`` in order on the job engine, skipping finished ones; returns {"ran", "left", "failed",
    "stopped"}. A finished job writes OUT/jobs/<job>.json; a failing one OUT/failed/<job>.txt (the others go on)."""
    import torch

    def execute(job: Job) -> None:
        try:
            ctx.check(float(ctx.cfg["min_job_s"]))
            _log(f"start {job.id}")
            t = time.time()
            result = job.fn(ctx, job)
        except DeadlineReached as why:  # before the job or inside it (a sweep stops between two points)
            _log(f"deadline: {why}")
            raise
        result.update(id=job.id, chain=job.chain, seconds=round(time.time() - t, 1),
                      finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        ctx.job_file(job.id).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(ctx.job_file(job.id), json.dumps(result, default=float, indent=1) + "\n")
        _log(f"done {job.id} in {result['seconds']:.0f} s")

    def on_error(job: Job, exc: Exception) -> str:
        import traceback

        tb = traceback.format_exc()
        print(tb, flush=True)
        (ctx.out / "failed").mkdir(parents=True, exist_ok=True)
        atomic_write_text(ctx.out / "failed" / f"{job.id}.txt", tb)
        _log(f"FAILED {job.id}: {exc!r}")
        return f"{job.id} (FAILED: {exc!r}; see failed/{job.id}.txt)"

    def after(job: Job) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    return engine_run_jobs(jobs, is_done=ctx.done, execute=execute, on_error=on_error, after=after)


def merge(cfg: dict, out: Path) -> dict:
    """Gather every finished job into OUT/results/: lm-<model>.json (records), topk, density profiles,
    generation outputs, training summaries and per-job timings."""

    jobs = build_jobs(cfg)
    tag = str(cfg.get("results_tag") or cfg["name"].replace("study-lm-", ""))
    res = out / "results"
    res.mkdir(parents=True, exist_ok=True)
    records, topk, density, training, timings = [], [], [], {}, []
    gen_xsum, gen_alpaca, preds = None, None, []
    finished = []
    for job in jobs:
        p = out / "jobs" / f"{job.id}.json"
        if not p.exists():
            continue
        d = json.loads(p.read_text())
        finished.append(job.id)
        records += [{**r, "job": job.id} for r in d.get("records", [])]
        topk += d.get("topk", []) or []
        density += d.get("density", []) or []
        if "train" in d:
            training[d["train"]["run"]] = d["train"]
        gen_xsum = d.get("gen_xsum", gen_xsum)
        gen_alpaca = d.get("gen_alpaca", gen_alpaca)
        preds += d.get("gen_predictions", []) or []
        timings.append({"job": job.id, "seconds": d.get("seconds"), "finished": d.get("finished")})
    files = {"lm": write_json(res / f"lm-{tag}.json", records),
             "timings": write_json(res / f"study-{tag}-meta.json", {
                 "name": cfg["name"], "model": records[0]["model"] if records else cfg["model"],
                 "train_tokens_budget": sorted({t.get("budget") for t in training.values()}) or None,
                 "train": cfg["train"],
                 "evaluation": cfg["evaluation"], "finished_jobs": finished,
                 "left_jobs": [j.id for j in jobs if j.id not in finished], "jobs": timings,
                 "training": training})}
    if topk:
        files["topk"] = write_json(res / f"topk-{tag}.json", topk)
    if density:
        files["density"] = write_json(res / f"density-profile-{tag}.json", density[0] if len(density) == 1 else
                                      {"profiles": density, **density[0]})
    if gen_xsum or gen_alpaca:
        files["gen"] = write_json(res / f"gen-{tag}-raw.json", {"xsum": gen_xsum, "alpaca": gen_alpaca})
    if preds:
        files["predictions"] = atomic_write_text(res / f"gen-{tag}-predictions.jsonl",
                                                 "".join(json.dumps(p) + "\n" for p in preds))
    return {"files": {k: str(v) for k, v in files.items()}, "finished": finished,
            "left": [j.id for j in jobs if j.id not in finished], "records": len(records)}


def run(recipe: dict, *, progress: bool = True, deadline: float | None = None, device: str | None = None,
        shard: str | None = None, train_tokens: int | None = None, out: str | None = None,
        merge_only: bool = False, do_merge: bool = True, jobs: list[str] | None = None) -> dict:
    """Run (this shard of) the LM study; returns {"ran", "left", "stopped", "merged", "out"}. ``deadline`` is
    an absolute ``time.time()``; re-running the same command continues where it stopped."""
    cfg = load_study(recipe, overrides={"train_tokens": train_tokens, "out": out, "device": device, "jobs": jobs})
    od = out_dir(cfg)
    od.mkdir(parents=True, exist_ok=True)
    if not merge_only:
        atomic_write_text(od / "study.json", json.dumps(cfg, indent=1, default=str) + "\n")
    result: dict = {"ran": [], "left": [], "stopped": None, "out": str(od)}
    if not merge_only:
        i, n = parse_shard(shard)
        jobs = shard_jobs(select_jobs(build_jobs(cfg), cfg.get("jobs")), i, n)
        _log(f"shard {i}/{n}: {len(jobs)} jobs ({', '.join(j.id for j in jobs)}); out {od}; "
             f"{'no deadline' if deadline is None else f'{deadline - time.time():.0f} s to the deadline'}")
        ctx = Context(cfg, od, cfg["device"], deadline, progress)
        result.update(run_jobs(ctx, jobs))
    if do_merge or merge_only:
        result["merged"] = merge(cfg, od)
    lines = [f"study {cfg['name']}: ran {len(result['ran'])} job(s)" + (f", stopped: {result['stopped']}"
                                                                          if result["stopped"] else "")]
    if result["left"]:
        lines.append("left for the next run: " + "; ".join(result["left"]))
    if result.get("merged"):
        m = result["merged"]
        lines.append(f"merged {m['records']} records from {len(m['finished'])} finished jobs into {od / 'results'}")
        if m["left"]:
            lines.append("not finished (any shard): " + ", ".join(m["left"]))
    result["summary"] = "\n".join(lines)
    return result
