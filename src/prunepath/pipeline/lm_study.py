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

import contextlib
import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from prunepath.errors import PrunePathError
from prunepath.evaluation.sweep import nearest_sparsity
from prunepath.evaluation.reports import atomic_write_text
from prunepath.baselines import activation
from prunepath.baselines import fitting
from prunepath.baselines.calibration import collect_ffn_inputs, token_batches
from prunepath.baselines.calibration import expert_mass
from prunepath.baselines.knobs import knob_for_sparsity
from prunepath.baselines.static import prune_experts
from prunepath.baselines.wanda import input_norms, target_linears
from prunepath.calibration import calibration_texts
from prunepath.data.corpora import is_corpus_name
from prunepath.data.instruct import load_examples
from prunepath.data.lm import build_instruct_dataset
from prunepath.data.text import load_texts
from prunepath.evaluation.allocation import allocate_layer_tau
from prunepath.evaluation.common import ActiveMeter, pad_id
from prunepath.evaluation.common import resolve_data_path
from prunepath.evaluation.generation import greedy_batch, stop_ids, uses_chat_template
from prunepath.evaluation.perplexity import tokenize_text
from prunepath.evaluation.reconstruction import topk_reconstruction
from prunepath.evaluation.reports import write_json
from prunepath.models.adapters import needs_bos
from prunepath.stats import router_byte_fraction
from prunepath.training.config import TrainConfig, load_recipe
from prunepath.training.selfgen import SelfCorpusInterrupted
from prunepath.training.trainer import TrainingStopped, _checkpoints, train_from_config
from prunepath.training.trainer import evaluate
import prunepath
from prunepath.routing.config import TAU_ALL, is_valid_tau, validate_tau
from prunepath.evaluation import perplexity
from prunepath.evaluation import generation
from prunepath.baselines import wanda

STUDY_KEYS = {"study", "name", "description", "model", "out", "seed", "train_tokens", "train", "stage1_fraction",
              "variants", "tau_min_runs", "lte", "evaluation", "sweep_taus", "near_tau", "baselines",
              "generation", "topk", "density", "device", "min_job_s",
              "save_margin_s", "min_train_s", "results_tag", "jobs", "activation", "allocation"}


def _log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class DeadlineReached(Exception):
    """The study stopped before its deadline; every finished piece of work is on disk."""


# ---- configuration -------------------------------------------------------------------------------------------
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
    cfg["density"] = {"targets": [0.5, 0.7], **(cfg.get("density") or {})}
    for t in cfg["sweep_taus"]:
        validate_tau(t, TAU_ALL, message=f"sweep_taus: every τ must be in (0, {TAU_ALL}] (got {t})")
    if int(cfg["train_tokens"]) < 1:
        raise PrunePathError("train_tokens must be >= 1")
    return cfg


def out_dir(cfg: dict) -> Path:
    return Path(cfg.get("out") or os.path.join("runs", cfg["name"])).expanduser().resolve()


def train_config(cfg: dict, run: str, device: str):
    """The TrainConfig of training run ``run`` (dense-ft, lte, main, paper, taumin-X) on the study budget."""

    common = dict(cfg["train"])
    budget = int(cfg["train_tokens"])
    settings: dict = {"model": cfg["model"], "seed": cfg["seed"], **common}
    frac = float(cfg["stage1_fraction"])
    if run == "dense-ft":
        settings["method"] = "dense"
    elif run == "lte":
        settings.update({"method": "lte", **{k: v for k, v in cfg["lte"].items() if k != "stage1_fraction"}})
        frac = float(cfg["lte"].get("stage1_fraction", frac))
    else:
        name, tau_min = (run, None)
        if run.startswith("taumin-"):
            name, tau_min = "main", float(run.split("-", 1)[1])
        var = dict(cfg["variants"][name])
        if "recipe" in var:  # e.g. the paper's defaults: schedule / loss / optimiser keys of a training recipe
            keep = {"stage1_steps", "stage2_steps", "batch_size", "grad_accum", "seq_len", "precision", "device",
                    "model", "task", "data", "out"}
            base = {k: v for k, v in load_recipe(var.pop("recipe")).items() if k not in keep}
            settings.update(base)
        var.pop("label", None)
        budget = int(var.pop("train_tokens", budget))
        frac = float(var.pop("stage1_fraction", frac))
        settings.update(var)
        settings["method"] = "prunepath"
        if tau_min is not None:
            settings["tau_min"] = tau_min
    tps = int(settings["batch_size"]) * int(settings.get("grad_accum", 1)) * int(settings["seq_len"])
    steps = max(2, math.ceil(budget / tps))
    s1 = min(steps - 1, max(1, round(steps * frac))) if settings["method"] != "dense" else steps // 2
    settings.update(stage1_steps=s1, stage2_steps=steps - s1, device=device, progress=False)
    return TrainConfig.from_dict(settings, where=f"study train run {run}")


# ---- jobs ----------------------------------------------------------------------------------------------------
@dataclass
class Job:
    id: str
    chain: str
    fn: Callable[["Context", "Job"], dict]
    deps: list[str] = field(default_factory=list)
    args: dict = field(default_factory=dict)


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
    chains = iter("DEFGHIJKLMNOP")
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


def select_jobs(jobs: list[Job], patterns: list[str] | None) -> list[Job]:
    """The jobs whose id matches one of ``patterns`` (shell wildcards; None: all). Their dependencies must be
    finished already or selected too; a run only waits for them, it never starts unselected work."""
    import fnmatch

    if not patterns:
        return jobs
    chosen = [j for j in jobs if any(fnmatch.fnmatchcase(j.id, p) for p in patterns)]
    if not chosen:
        raise PrunePathError(f"jobs: no job matches {', '.join(patterns)}; jobs are "
                             f"{', '.join(j.id for j in jobs)}")
    return chosen


def chains_of(jobs: list[Job]) -> list[str]:
    seen: list[str] = []
    for j in jobs:
        if j.chain not in seen:
            seen.append(j.chain)
    return seen


def shard_jobs(jobs: list[Job], index: int, count: int) -> list[Job]:
    """The jobs of shard ``index`` of ``count``: whole chains, chain c (in order of first appearance) to shard
    c mod count; every job lands in exactly one shard and its dependencies in the same one."""
    if count < 1 or not 0 <= index < count:
        raise PrunePathError(f"--shard {index}/{count}: need 0 <= i < n (e.g. --shard 0/2 and --shard 1/2)")
    order = chains_of(jobs)
    mine = {c for i, c in enumerate(order) if i % count == index}
    return [j for j in jobs if j.chain in mine]


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError as exc:
        raise PrunePathError(f"--shard takes i/n, e.g. 0/2 (got {text!r})") from exc
    if n < 1 or not 0 <= i < n:
        raise PrunePathError(f"--shard {text}: need 0 <= i < n")
    return i, n


# ---- the run context -----------------------------------------------------------------------------------------
class Context:
    def __init__(self, cfg: dict, out: Path, device: str, deadline: float | None, progress: bool) -> None:
        self.cfg, self.out, self.device, self.deadline, self.progress = cfg, out, device, deadline, progress
        self._ids = None
        self._calib = None
        self._display = None

    # time
    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.time()

    def check(self, need: float = 0.0) -> None:
        if self.left() < need:
            raise DeadlineReached(f"{max(self.left(), 0):.0f} s left, need {need:.0f} s")

    # files
    def job_file(self, job_id: str) -> Path:
        return self.out / "jobs" / f"{job_id}.json"

    def done(self, job_id: str) -> bool:
        return self.job_file(job_id).exists()

    def partial(self, job_id: str) -> list[dict]:
        p = self.out / "partial" / f"{job_id}.jsonl"
        rows = []
        if p.exists():
            for line in p.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut short: recompute from here
        return rows

    def add_partial(self, job_id: str, row: dict) -> None:
        p = self.out / "partial" / f"{job_id}.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        rows = self.partial(job_id) + [row]
        atomic_write_text(p, "".join(json.dumps(r, default=float) + "\n" for r in rows))

    def ckpt(self, run: str) -> Path:
        return self.out / "ckpt" / run

    # shared inputs
    def eval_ids(self):
        if self._ids is None:

            _, tok = self.load_base(tokenizer_only=True)
            ev = self.cfg["evaluation"]
            self._ids = tokenize_text(tok, resolve_data_path(ev["data"]), ev.get("max_tokens"), progress=False)
        return self._ids

    def calib_texts(self) -> list[str]:
        if self._calib is None:

            src = str(self.cfg["baselines"]["calib"])
            if is_corpus_name(src):  # round-robin over the corpora's training documents

                self._calib, _ = calibration_texts(src)
            else:

                self._calib = load_texts(src, "train", seed=int(self.cfg["seed"]))
        return self._calib

    def display(self) -> str:
        if self._display is None:
            self.load_base(tokenizer_only=True)
        return self._display

    def load_base(self, tokenizer_only: bool = False):

        model, tok = prunepath.load_model(self.cfg["model"])
        self._display = getattr(model, "prunepath_display_name", None) or str(self.cfg["model"])
        if tokenizer_only:
            del model
            return None, tok
        return model.to(self.torch_device()).eval(), tok

    def load_ckpt(self, run: str, to_device: bool = True):

        path = self.ckpt(run)
        if (path / "prunepath_config.json").exists():
            model, tok = prunepath.load(path)
        else:
            model, tok = prunepath.load_model(str(path))
        if tok is None:
            _, tok = self.load_base(tokenizer_only=True)
        model.prunepath_display_name = self.display()
        return (model.to(self.torch_device()) if to_device else model).eval(), tok

    def torch_device(self):
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def ppl(self, model, tok) -> dict:

        ev = self.cfg["evaluation"]
        t = time.time()
        res = perplexity.evaluate_perplexity(model, tok, self.eval_ids(), window=int(ev["window"]),
                                  batch_size=int(ev["batch_size"]), progress=False)
        res["eval_s"] = round(time.time() - t, 2)
        return res

    def train_tokens(self, run: str) -> int:
        p = self.ckpt(run) / "train_result.json"
        return int(json.loads(p.read_text()).get("tokens", 0)) if p.exists() else 0

    def record(self, method: str, res: dict, **extra) -> dict:
        """One results row in the documented format."""
        row = {"method": method, "model": self.display(), "s_ffn": float(res.get("s_ffn", 0.0)),
               "ppl": float(res["ppl"]), "nll": float(res["nll"]), "tau": None,
               "eval_tokens": int(res["tokens"]), "train_tokens": 0, "seed": self.cfg["seed"],
               "window": res.get("window"), "eval_data": self.cfg["evaluation"]["data"],
               "mean_active": res.get("mean_active"), "per_layer_s_ffn": res.get("per_layer_s_ffn"),
               "eval_s": res.get("eval_s")}
        row.update(extra)
        return row


# ---- job implementations -------------------------------------------------------------------------------------
def job_dense(ctx: Context, job: Job) -> dict:
    model, tok = ctx.load_base()
    res = ctx.ppl(model, tok)
    return {"records": [ctx.record("dense", res, variant="no training")]}


def job_train(ctx: Context, job: Job) -> dict:
    """Train one run on the study budget, resuming from its last checkpoint; stops (checkpointed) at the
    deadline."""

    run = job.args["run"]
    ctx.check(float(ctx.cfg.get("min_train_s", 0)))  # data + warm start + a first checkpoint must fit
    cfg = train_config(ctx.cfg, run, str(ctx.torch_device()).split(":")[0])
    path = ctx.ckpt(run)
    if path.exists() and not _checkpoints(path):
        shutil.rmtree(path)  # started but never checkpointed: start again
    if path.exists():
        state = json.loads((_checkpoints(path)[-1] / "trainer_state.json").read_text())["config"]
        if (state["stage1_steps"], state["stage2_steps"]) != (cfg.stage1_steps, cfg.stage2_steps):
            raise PrunePathError(f"{job.id}: the checkpoint in {path} was trained for {state['stage1_steps']}+"
                                 f"{state['stage2_steps']} steps but this run asks for {cfg.stage1_steps}+"
                                 f"{cfg.stage2_steps} (train_tokens changed?); pass the same --train-tokens as "
                                 "before or delete that folder")
        cfg.resume = "auto"
        _log(f"{job.id}: resuming from {_checkpoints(path)[-1].name}")
    model, tok = ctx.load_base()
    margin = float(ctx.cfg.get("save_margin_s", 25))
    _log(f"{job.id}: {cfg.method}, {cfg.stage1_steps}+{cfg.stage2_steps} steps x {cfg.tokens_per_step} tokens")
    t = time.time()
    try:
        result = train_from_config(model, tok, cfg, out_dir=path,
                                   should_stop=lambda: ctx.left() < margin)
    except TrainingStopped as stop:
        raise DeadlineReached(f"{job.id} checkpointed at step {stop.step}") from None
    except SelfCorpusInterrupted as stop:
        raise DeadlineReached(f"{job.id}: self-distillation corpus {stop}") from None
    return {"records": [], "train": {"run": run, "method": cfg.method, "tokens": result.tokens,
                                     "budget": int(ctx.cfg["train_tokens"]),
                                     "steps": result.steps, "seconds_total": round(result.seconds, 1),
                                     "seconds_this_call": round(time.time() - t, 1),
                                     "final_train_loss": result.train_loss, "final_s_ffn": result.s_ffn,
                                     "config": cfg.to_dict(), "calibration": _small(result.calibration)}}


def _small(obj):
    """Calibration info without big per-token lists."""
    if isinstance(obj, dict):
        return {k: _small(v) for k, v in obj.items()}
    if isinstance(obj, list) and len(obj) > 64:
        return f"[{len(obj)} values]"
    return obj


def job_eval_dense_ft(ctx: Context, job: Job) -> dict:
    model, tok = ctx.load_ckpt("dense-ft")
    res = ctx.ppl(model, tok)
    return {"records": [ctx.record("dense-finetuned", res, variant="dense fine-tuned",
                                   train_tokens=ctx.train_tokens("dense-ft"))]}


def _sweep(ctx: Context, job: Job, points: list, apply: Callable, make_row: Callable) -> list[dict]:
    """Evaluate ``points`` one by one (``apply(point)`` sets the model up), continuing after the ones done."""
    done = {json.dumps(r["_point"]): r for r in ctx.partial(job.id)}
    rows = []
    for p in points:
        key = json.dumps(p)
        if key not in done:
            ctx.check(float(ctx.cfg["min_job_s"]))
            row = make_row(p, apply(p))
            row["_point"] = p
            ctx.add_partial(job.id, row)
            _log(f"{job.id} {p}: s_FFN {row['s_ffn']:.3f} PPL {row['ppl']:.3f}")
            done[key] = row
        rows.append(done[key])
    return rows


def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _variant_label(ctx: Context, run: str) -> str:
    name = "main" if run.startswith("taumin-") else run
    return str(ctx.cfg["variants"].get(name, {}).get("label", name))


def job_eval_prunepath(ctx: Context, job: Job) -> dict:
    """A trained PrunePath checkpoint: the τ sweep (``sweep``) and its τ_min ± near_tau; the main run also gives
    the density profile and the top-k reconstruction."""

    run = job.args["run"]
    model, tok = ctx.load_ckpt(run)
    info = json.loads((ctx.ckpt(run) / "train_result.json").read_text()) if (ctx.ckpt(run) / "train_result.json").exists() else {}
    tcfg = json.loads((ctx.ckpt(run) / "train_config.json").read_text())
    tau_min = float(tcfg["tau_min"])
    variant, train_tokens = _variant_label(ctx, run), int(info.get("tokens", 0))
    near = sorted({round(tau_min + d, 4) for d in ctx.cfg["near_tau"] if is_valid_tau(tau_min + d, TAU_ALL)}, reverse=True)
    points = sorted({float(t) for t in ctx.cfg["sweep_taus"]} | set(near), reverse=True) if job.args["sweep"] \
        else near

    def apply(tau):
        with prunepath.routing(model, tau=tau):
            return ctx.ppl(model, tok)

    struct = _structure(model)

    def make_row(tau, res):
        row = ctx.record("prunepath-sweep", res, tau=tau, tau_min=tau_min, variant=variant,
                         train_tokens=train_tokens, run=run, **struct)
        row["_active_hist"] = res.get("active_hist")
        row["_num_experts"] = res.get("num_experts")
        return row

    rows = _sweep(ctx, job, points, apply, make_row)
    records = []
    for r in rows:
        r = dict(r)
        if r["tau"] in near:  # the checkpoint at (and near) the τ it was trained to
            records.append({**_strip(r), "method": "prunepath"})
        if job.args["sweep"]:
            records.append(_strip(r))
    out: dict = {"records": records}
    if run == "main":
        out["density"] = _density(ctx, rows)
        out["topk"] = _topk(ctx, model, tok, "prunepath", {"tau": TAU_ALL}, run)
    return out


def _structure(model) -> dict:
    """Expert size and the router's share of the FFN bytes (read by every token), for the records."""

    cfg = model.prunepath_config
    return {"neurons_per_expert": int(cfg.neurons_per_expert), "num_experts": int(cfg.num_experts),
            "router_bytes_frac": round(router_byte_fraction(model), 6)}


def _density(ctx: Context, rows: list[dict]) -> list[dict]:
    """Per-layer histograms of active experts per token at the τ nearest each target s_FFN."""
    out = []
    for target in ctx.cfg["density"]["targets"]:
        r = nearest_sparsity([r for r in rows if r.get("_active_hist")], float(target))
        out.append({"model": r["model"], "tau": r["tau"], "s_ffn": r["s_ffn"], "target_s_ffn": float(target),
                    "num_experts": r["_num_experts"], "tokens": r["eval_tokens"], "data": r["eval_data"],
                    "layers": [{"layer": i, "counts": {str(n): int(c) for n, c in enumerate(h) if c}}
                               for i, h in enumerate(r["_active_hist"])]})
    return out


def _topk(ctx: Context, model, tok, router: str, dense_routing: dict, source: str) -> list[dict]:
    """Top-k reconstruction of one router, FFN inputs from an all-expert forward."""

    try:
        with prunepath.routing(model, **dense_routing):
            rows = topk_reconstruction(model, tok, ctx.eval_ids(), max_tokens=int(ctx.cfg["topk"]["max_tokens"]),
                                       window=int(ctx.cfg["evaluation"]["window"]), progress=False)
    except Exception as exc:  # noqa: BLE001 - a side measurement must not lose the job's main results
        _log(f"top-k reconstruction for {router} failed: {exc!r}")
        return [{"router": router, "error": repr(exc)}]
    return [{"router": router, "source": source, "model": ctx.display(), **r} for r in rows]


def _calib_inputs(ctx: Context, model, tok):

    b = ctx.cfg["baselines"]
    batches = token_batches(tok, ctx.calib_texts(), seq_len=int(b["calib_seq_len"]), max_tokens=int(b["calib_tokens"]))
    dev = ctx.torch_device()
    return [x.to(dev) for x in collect_ffn_inputs(model, batches, progress=False)]


def job_eval_lte(ctx: Context, job: Job) -> dict:

    model, tok = ctx.load_ckpt("lte")
    inputs = _calib_inputs(ctx, model, tok)
    tt = ctx.train_tokens("lte")
    eta = ctx.cfg["lte"].get("method_params", {}).get("eta")
    points = [{"threshold": 0.5}] + [{"target": float(t)} for t in ctx.cfg["baselines"]["targets"]]

    def apply(p):
        if "threshold" in p:
            delta, s_cal = p["threshold"], None
        else:
            delta, s_cal = knob_for_sparsity(model, inputs, "lte", p["target"])
        prunepath.configure(model, method="lte", params={"soft": False, "threshold": float(delta)})
        return {**ctx.ppl(model, tok), "_delta": delta, "_s_cal": s_cal}

    def make_row(p, res):
        return ctx.record("lte", res, delta=res["_delta"], knob={"threshold": res["_delta"]}, eta=eta,
                          target_s_ffn=p.get("target"), s_ffn_calibration=res["_s_cal"], train_tokens=tt,
                          variant="trained (method lte)")

    rows = _sweep(ctx, job, points, apply, make_row)
    recs = [_strip(r) for r in rows]
    return {"records": recs, "topk": _topk(ctx, model, tok, "lte", {"method": "lte",
                                                                   "params": {"soft": False, "threshold": 0.0}}, "lte")}


def _base_model(ctx: Context, to_device: bool = True):
    """The dense model the pruning / router baselines start from (``baselines.base``), its training tokens and
    the results' variant label."""
    if ctx.cfg["baselines"]["base"] == "original":
        model, tok = ctx.load_base()
        if not to_device:
            model.cpu()
        return model, tok, 0, "original"
    model, tok = ctx.load_ckpt("dense-ft", to_device=to_device)
    return model, tok, ctx.train_tokens("dense-ft"), "dense-finetuned"


def job_wanda(ctx: Context, job: Job) -> dict:
    import torch


    model, tok, tt, base = _base_model(ctx)
    mods = target_linears(model, "ffn")
    saved = {n: m.weight.detach().clone() for n, m in mods.items()}
    state: dict = {}

    def apply(s):
        if "norms" not in state:
            b = ctx.cfg["baselines"]
            state["norms"] = input_norms(model, mods, token_batches(
                tok, ctx.calib_texts(), seq_len=int(b["calib_seq_len"]), max_tokens=int(b["calib_tokens"])), False)
        with torch.no_grad():
            for n, m in mods.items():
                m.weight.copy_(saved[n])
        info = wanda.apply_wanda(model, tok, [], float(s), norms=state["norms"], progress=False)
        return ctx.ppl(model, tok) | {"_achieved": info["sparsity"]}

    def make_row(s, res):
        return ctx.record("wanda", res, knob={"weight_sparsity": s}, weight_sparsity=res["_achieved"],
                          train_tokens=tt, variant=f"on {base}",
                          note="s_ffn = FFN weight sparsity (unstructured; no speed-up)")

    rows = _sweep(ctx, job, [float(s) for s in ctx.cfg["baselines"]["wanda"]], apply, make_row)
    return {"records": [_strip(r) for r in rows]}


def _converted_base(ctx: Context):

    model, tok, tt, base = _base_model(ctx, to_device=False)  # cluster on the CPU, then move
    npe = int(ctx.cfg["train"].get("neurons_per_expert", 32))
    prunepath.moefy(model, neurons_per_expert=npe, seed=int(ctx.cfg["seed"]), progress=False)
    model.to(ctx.torch_device()).eval()
    return model, tok, tt, base


def job_router_baseline(ctx: Context, job: Job) -> dict:
    """MoEfication top-k (k sweep) or D2DMoE (τ sweep): router fitted on the frozen dense-finetuned model."""

    method = job.args["method"]
    model, tok, tt, base = _converted_base(ctx)
    inputs = _calib_inputs(ctx, model, tok)
    b = ctx.cfg["baselines"]
    ctx.check(float(ctx.cfg["min_job_s"]))
    t = time.time()
    info = fitting.fit_router(model, method=method, steps=int(b["fit_steps"]), batch_size=int(b["fit_batch"]),
                              lr=float(b["fit_lr"]), inputs=inputs, seed=int(ctx.cfg["seed"]), progress=False)
    fit_s = round(time.time() - t, 1)
    fit_loss = sum(info["final_loss"]) / len(info["final_loss"])

    def apply(target):
        knob, s_cal = knob_for_sparsity(model, inputs, method, float(target))
        setting = {"k": int(knob)} if method == "moefication" else {"tau": float(knob)}
        prunepath.configure(model, method=method, **setting)
        return {**ctx.ppl(model, tok), "_setting": setting, "_s_cal": s_cal}

    def make_row(target, res):
        st = res["_setting"]
        return ctx.record("moefication-topk" if method == "moefication" else method, res, knob=st,
                          k=st.get("k"), tau=st.get("tau"), target_s_ffn=float(target),
                          s_ffn_calibration=res["_s_cal"], fit_final_loss_mean=fit_loss, fit_s=fit_s,
                          train_tokens=tt, variant=f"router fitted on frozen {base}")

    rows = _sweep(ctx, job, [float(t) for t in b["targets"]], apply, make_row)
    out = {"records": [_strip(r) for r in rows]}
    if method == "moefication":
        e = model.prunepath_config.num_experts
        out["topk"] = _topk(ctx, model, tok, "moefication", {"method": "moefication", "k": e}, f"{base} + fit")
    return out


def job_static(ctx: Context, job: Job) -> dict:
    import torch



    model, tok, tt, base = _converted_base(ctx)
    state: dict = {}

    def apply(s):
        if "mass" not in state:
            inputs = _calib_inputs(ctx, model, tok)
            with torch.no_grad():
                state["mass"] = [expert_mass(f, x).sum(0).double().cpu()
                                 for f, x in zip(prunepath.prunepath_modules(model), inputs)]
        prune_experts(model, tok, [], float(s), mass=state["mass"], progress=False)
        return ctx.ppl(model, tok)

    def make_row(s, res):
        return ctx.record("static", res, knob={"sparsity": s}, target_s_ffn=float(s), train_tokens=tt,
                          variant=f"experts pruned on {base}")

    rows = _sweep(ctx, job, [float(t) for t in ctx.cfg["baselines"]["targets"]], apply, make_row)
    return {"records": [_strip(r) for r in rows]}


ACTIVATION_JOBS = {"teal": ("teal", "uniform"), "teal-greedy": ("teal", "greedy"), "cats": ("cats", None)}


def job_activation(ctx: Context, job: Job) -> dict:
    """TEAL (uniform or greedy allocation) or CATS on the original model: thresholds calibrated once on the
    calibration text for every target; s_FFN is the measured fraction of FFN bytes not read per token."""

    method, allocation = ACTIVATION_JOBS[job.args["method"]]
    model, tok = ctx.load_base()
    a = ctx.cfg["activation"]
    state: dict = {}

    def apply(target):
        if "stats" not in state:
            t = time.time()
            state["stats"] = activation.collect_activation_stats(
                model, tok, ctx.calib_texts(), max_tokens=int(a["calib_tokens"]),
                seq_len=int(ctx.cfg["evaluation"]["window"]), progress=False)
            state["calib_s"] = round(time.time() - t, 1)
        spec = activation.teal_thresholds(state["stats"], float(target), allocation=allocation) \
            if method == "teal" else activation.cats_thresholds(state["stats"], float(target))
        activation.apply_activation_sparsity(model, spec)
        return ctx.ppl(model, tok)

    def make_row(target, res):
        return ctx.record(job.args["method"], res, target_s_ffn=float(target), knob={"target": float(target)},
                          variant="training-free, on original" + (f", {allocation} allocation" if allocation else ""),
                          calib_tokens=int(a["calib_tokens"]), calib_s=state.get("calib_s"),
                          note="s_ffn = measured fraction of FFN weight bytes not read per token")

    rows = _sweep(ctx, job, [float(t) for t in a["targets"]], apply, make_row)
    return {"records": [_strip(r) for r in rows]}


def job_allocation(ctx: Context, job: Job) -> dict:
    """Per-layer τ chosen on calibration text for each global target s_FFN (``allocation.method``), evaluated."""

    run = job.args["run"]
    model, tok = ctx.load_ckpt(run)
    al = ctx.cfg["allocation"]
    info = json.loads((ctx.ckpt(run) / "train_result.json").read_text())
    calib = ctx.calib_texts()

    def apply(target):
        t = time.time()
        chosen = allocate_layer_tau(model, tok, calib, float(target), method=str(al["method"]),
                                    max_tokens=int(al["calib_tokens"]),
                                    window=int(ctx.cfg["evaluation"]["window"]), progress=False)
        with prunepath.routing(model, layer_tau=chosen["layer_tau"]):
            res = ctx.ppl(model, tok)
        return {**res, "_alloc": {"layer_tau": chosen["layer_tau"], "s_ffn_calibration": chosen.get("s_ffn"),
                                  "alloc_s": round(time.time() - t, 1)}}

    struct = _structure(model)

    def make_row(target, res):
        return ctx.record("prunepath-alloc", res, target_s_ffn=float(target), run=run, **struct,
                          variant=f"{_variant_label(ctx, run)}, {al['method']} per-layer τ",
                          train_tokens=int(info.get("tokens", 0)), **res["_alloc"])

    rows = _sweep(ctx, job, [float(t) for t in al["targets"]], apply, make_row)
    return {"records": [_strip(r) for r in rows]}


def _gen_taus(ctx: Context) -> list[tuple[float, float]]:
    """(τ, s_FFN) of the generating checkpoint nearest each generation target s_FFN (from its sweep)."""
    rows = json.loads(ctx.job_file(f"eval-{ctx.cfg['generation']['run']}").read_text())["records"]
    rows = [r for r in rows if r["method"] == "prunepath-sweep"]
    picked = []
    for t in ctx.cfg["generation"]["targets"]:
        r = nearest_sparsity(rows, float(t))
        if (r["tau"], r["s_ffn"]) not in picked:
            picked.append((r["tau"], r["s_ffn"]))
    return picked


def _systems(ctx: Context):
    """(name, tau, model, tok) for dense and the generating checkpoint (``generation.run``, default main) at the
    generation τs (models loaded lazily)."""
    yield "dense", None, *ctx.load_base()
    model, tok = ctx.load_ckpt(ctx.cfg["generation"]["run"])
    for tau, _ in _gen_taus(ctx):
        yield f"prunepath@{tau:g}", tau, model, tok


def job_gen_xsum(ctx: Context, job: Job) -> dict:
    """Greedy summaries (ROUGE is scored on another machine from the predictions)."""
    import torch


    g = ctx.cfg["generation"]
    examples = load_examples(g["xsum"])[: int(g["xsum_docs"])]
    done = {r["_point"] for r in ctx.partial(job.id)}
    for name, tau, model, tok in _systems(ctx):
        if name in done:
            continue
        ctx.check(float(ctx.cfg["min_job_s"]))
        t = time.time()
        bos = int(tok.bos_token_id) if needs_bos(model, tok) else None
        chat, stops = uses_chat_template(tok), stop_ids(tok)
        meter, pre = ActiveMeter(model), ActiveMeter(model)
        preds = []
        batch = int(g.get("batch_size", 16))
        ctxm = prunepath.routing(model, tau=tau) if tau is not None else contextlib.nullcontext()
        with ctxm, torch.inference_mode():
            for i in range(0, len(examples), batch):
                # a system may take minutes: stop before the deadline, not after it (the system is redone on resume)
                ctx.check(3 * (time.time() - t) * batch / i if i else 0.0)
                chunk = examples[i:i + batch]
                prompts = [generation._prompt_ids(tok, ex, int(g["max_input_tokens"]), bos, chat) for ex in chunk]
                outs = greedy_batch(model, prompts, int(g["max_new_tokens"]), stops,
                                    pad=pad_id(tok), prefill_meter=pre, decode_meter=meter)
                for j, (ex, out) in enumerate(zip(chunk, outs)):
                    text = tok.decode(out, skip_special_tokens=True).strip().split("\n\n")[0].strip()
                    preds.append({"system": name, "tau": tau, "id": ex.get("id", i + j), "prediction": text,
                                  "reference": ex.get("summary", ex["response"]).strip()})
        m = meter.result()
        ctx.add_partial(job.id, {"_point": name, "system": name, "tau": tau, "s_ffn_decode": m["s_ffn"],
                                 "s_ffn_prefill": pre.result()["s_ffn"], "examples": len(preds),
                                 "seconds": round(time.time() - t, 1), "predictions": preds})
        _log(f"{job.id} {name}: {len(preds)} summaries, decode s_FFN {m['s_ffn']:.3f}")
    rows = ctx.partial(job.id)
    summary = [{k: v for k, v in r.items() if k not in ("_point", "predictions")} for r in rows]
    return {"records": [], "gen_xsum": {"model": ctx.display(), "data": g["xsum"],
                                        "max_new_tokens": g["max_new_tokens"], "decoding": "greedy",
                                        "systems": summary},
            "gen_predictions": [p for r in rows for p in r["predictions"]]}


def job_gen_alpaca(ctx: Context, job: Job) -> dict:
    """Prompt-masked instruction loss on the Alpaca sample and a few greedy generations, dense vs sparse."""
    import torch


    g = ctx.cfg["generation"]
    examples = load_examples(g["alpaca"])
    # the last examples: the study never trains on Alpaca, but keep away from the head used elsewhere
    loss_ex = examples[-int(g["alpaca_examples"]):]
    gen_ex = examples[: int(g["alpaca_generations"])]
    done = {r["_point"] for r in ctx.partial(job.id)}
    for name, tau, model, tok in _systems(ctx):
        if name in done:
            continue
        ctx.check(float(ctx.cfg["min_job_s"]))
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        ds = build_instruct_dataset(loss_ex, tok, 512)
        bos = int(tok.bos_token_id) if needs_bos(model, tok) else None
        ctxm = prunepath.routing(model, tau=tau) if tau is not None else contextlib.nullcontext()
        with ctxm, torch.inference_mode():
            ev = evaluate(model, ds, "instruct", batch_size=8, device=ctx.torch_device())
            # through the chat template, as XSum: the bare prompt gets end-of-turn at once
            prompts = [generation._prompt_ids(tok, ex, int(g["max_input_tokens"]), bos, uses_chat_template(tok))
                       for ex in gen_ex]
            outs = greedy_batch(model, prompts, int(g["max_new_tokens"]) * 2, stop_ids(tok), pad=pad_id(tok))
            gens = [{"prompt": ex["prompt"], "response": tok.decode(out, skip_special_tokens=True).strip(),
                     "reference": ex["response"]} for ex, out in zip(gen_ex, outs)]
        ctx.add_partial(job.id, {"_point": name, "system": name, "tau": tau, "loss": ev["loss"], "ppl": ev["ppl"],
                                 "tokens": ev["tokens"], "s_ffn": ev["s_ffn"], "generations": gens})
        _log(f"{job.id} {name}: instruction loss {ev['loss']:.3f} at s_FFN {ev['s_ffn']:.3f}")
    rows = [{k: v for k, v in r.items() if k != "_point"} for r in ctx.partial(job.id)]
    return {"records": [], "gen_alpaca": {"model": ctx.display(), "data": g["alpaca"],
                                          "loss_examples": len(loss_ex), "seq_len": 512, "systems": rows}}


# ---- driver --------------------------------------------------------------------------------------------------
def run_jobs(ctx: Context, jobs: list[Job]) -> dict:
    """Run ``jobs`` in order, skipping finished ones; returns {"done", "ran", "left", "stopped"}."""
    import torch

    ran, left, failed, stopped = [], [], [], None
    for i, job in enumerate(jobs):
        if ctx.done(job.id):
            continue
        missing = [d for d in job.deps if not ctx.done(d)]
        if stopped is not None or missing:
            left.append(job.id + (f" (waits for {', '.join(missing)})" if missing and stopped is None else ""))
            continue
        try:
            ctx.check(float(ctx.cfg["min_job_s"]))
            _log(f"start {job.id}")
            t = time.time()
            result = job.fn(ctx, job)
            result.update(id=job.id, chain=job.chain, seconds=round(time.time() - t, 1),
                          finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            ctx.job_file(job.id).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(ctx.job_file(job.id), json.dumps(result, default=float, indent=1) + "\n")
            ran.append(job.id)
            _log(f"done {job.id} in {result['seconds']:.0f} s")
        except DeadlineReached as why:
            stopped = str(why)
            left.append(job.id + " (interrupted: resumes on the next run)")
            _log(f"deadline: {why}")
        except Exception as exc:  # noqa: BLE001 - one failing job must not stop the independent ones
            import traceback

            tb = traceback.format_exc()
            print(tb, flush=True)
            (ctx.out / "failed").mkdir(parents=True, exist_ok=True)
            atomic_write_text(ctx.out / "failed" / f"{job.id}.txt", tb)
            failed.append(job.id)
            left.append(f"{job.id} (FAILED: {exc!r}; see failed/{job.id}.txt)")
            _log(f"FAILED {job.id}: {exc!r}")
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return {"ran": ran, "left": left, "failed": failed, "stopped": stopped}


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
