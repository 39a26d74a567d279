"""The NLU study (issue 7, item 2): MiniLM-L6 fine-tuned on SST-2, MRPC, RTE and CoLA; metric vs s_FFN for the
dense fine-tuned model, PrunePath (fine-tune dense → MoEfy the fine-tuned weights → train routing; one checkpoint
swept over τ), LTE (δ swept), Wanda (several sparsities) and the clustering ablation (experts clustered from the
fine-tuned vs the pretrained FFN weights).

    prunepath run recipes/study-nlu-minilm.yaml                   # (dispatched here by ``study: nlu``)
    prunepath nlu-study recipes/study-nlu-minilm.yaml --device cuda --out DIR
    prunepath nlu-study --report DIR/nlu-minilm.json --plot docs/img/study-nlu-minilm.png

Work is done in units (``<task>/<phase>``) in priority order: dense + PrunePath on every task, then LTE and
Wanda, then the ablation. The record list (``OUT/nlu-minilm.json``) is rewritten atomically after every unit, so
it is valid JSON at any time; a re-run skips finished units (fine-tuned dense weights are kept in
``OUT/finetuned/<task>``). With a deadline, a unit whose estimated time does not fit is skipped (listed in
``OUT/status.json``).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

from prunepath.errors import PrunePathError
from prunepath.conversion.clustering import cluster_neurons, resolve_expert_count
from prunepath.data.glue import GlueData, load_glue
from prunepath.evaluation.classification import evaluate_classification
from prunepath.evaluation.common import shared_data_dir
from prunepath.evaluation.reports import atomic_write_text
from prunepath.models.adapters import adapter_for
from prunepath.models.loading import display_name
from prunepath.pipeline.jobs import Deadline, Job, run_jobs
from prunepath.state import state_of
from prunepath.training.config import TrainConfig
from prunepath.training.data import encode_classification
from prunepath.training.config import load_recipe
from prunepath.training.trainer import train
import prunepath
from prunepath.baselines import wanda
from prunepath.pipeline.nlu_config import (  # noqa: F401  (re-exported: the study's names stay importable here)
    DEFAULTS, PHASES, PRIMARY, RECORDS_NAME, TASK_FILES, _numbers, _TRAIN_KEYS, validate_recipe)
from prunepath.pipeline.nlu_report import _label, plot_records, render_markdown  # noqa: F401  (re-exported)


def _log(msg: str) -> None:
    print(f"[nlu] {time.strftime('%H:%M:%S')} {msg}", flush=True)


# ---- recipe ----------------------------------------------------------------------------------------------------
def _device(r: dict) -> str:
    if r["device"] == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(r["device"]).startswith("cuda") and not torch.cuda.is_available():
        raise PrunePathError(f"device {r['device']} asked for a GPU but none is available here; use device: cpu")
    return str(r["device"])


def _data_dir(r: dict) -> Path:
    if r["data_dir"]:
        return Path(r["data_dir"]).expanduser()
    if os.environ.get("DATA_DIR"):
        return Path(os.environ["DATA_DIR"])

    return Path(shared_data_dir())


def load_task(r: dict, task: str):
    """(train GlueData, dev GlueData, subsampled?) for ``task`` from the data folder."""
    import random


    root = _data_dir(r) / task
    tr_name, dev_name = TASK_FILES[task]
    for name in (tr_name, dev_name):
        if not (root / name).exists():
            raise PrunePathError(f"{root / name} is missing; set data_dir (or $DATA_DIR) to a folder holding "
                                 f"{task}/{tr_name} and {task}/{dev_name}")
    train = load_glue(root / tr_name, task)
    dev = load_glue(root / dev_name, task).head(r["max_eval_examples"])
    cap = r["max_train_examples"]
    cap = cap.get(task) if isinstance(cap, dict) else cap
    sub = False
    if cap is not None and int(cap) < len(train):
        idx = sorted(random.Random(r["seed"]).sample(range(len(train)), int(cap)))
        train = GlueData(task, [train.texts[i] for i in idx], [train.labels[i] for i in idx], train.num_labels,
                         train.path, train.label_names)
        sub = True
    return train, dev, sub


# ---- model helpers -----------------------------------------------------------------------------------------------
def _load_base(r: dict, num_labels: int = 2):
    torch.manual_seed(r["seed"])  # the new classification head (and pooler if absent) is seeded
    model, tok = prunepath.load_model(r["model"], task="classify", num_labels=num_labels)
    if tok is None:
        raise PrunePathError(f"{r['model']} has no tokenizer; the NLU study needs one stored with the model")
    return model, tok


def _unwrap_autocast(model) -> None:
    if hasattr(model, "_original_forward"):  # accelerate's autocast wrapper: evaluate like the rest
        model.forward = model._original_forward


def cluster_permutations(model, neurons_per_expert: int, seed: int = 0) -> list[torch.Tensor]:
    """Balanced k-means permutations of every FFN of a dense ``model`` (what moefy would use)."""

    adapter = adapter_for(model)
    perms = []
    for site in adapter.sites(model):
        dense = adapter.extract(site)
        e, _ = resolve_expert_count(dense.intermediate_size, neurons_per_expert, None)
        perms.append(cluster_neurons(dense.cluster_rows.detach().float().cpu(), e, method="kmeans", seed=seed))
    return perms


# ---- the study ---------------------------------------------------------------------------------------------------
class Study:
    """State of one run: records, timing estimates, fine-tuned weights per task."""

    def __init__(self, r: dict, out: Path, progress: bool, deadline: float | None) -> None:
        self.r, self.out, self.progress, self.deadline = r, out, progress, deadline
        self.device = _device(r)
        self.records_path = out / RECORDS_NAME
        self.records: list[dict] = json.loads(self.records_path.read_text()) if self.records_path.exists() else []
        self.done = {rec.get("unit") for rec in self.records}
        self.skipped: list[dict] = []
        self.failed: list[dict] = []
        self.sec_per_step: dict[str, float] = {}  # kind (dense / prunepath / lte) → seconds per step, measured
        self.sec_per_eval: float | None = None  # one dev-set evaluation, measured
        self.finetuned: dict[str, dict] = {}  # task → state dict (CPU)
        self.data: dict[str, tuple] = {}
        self.base = None
        self.tok = None
        self.pretrained_perms: list[torch.Tensor] | None = None
        self.t0 = time.time()

    # ---- bookkeeping
    def save(self) -> None:
        text = json.dumps(self.records, indent=1, default=float) + "\n"
        atomic_write_text(self.records_path, text)
        if self.r["results"]:
            atomic_write_text(Path(self.r["results"]), text)
        status = {"elapsed_s": round(time.time() - self.t0, 1), "skipped": self.skipped, "failed": self.failed,
                  "done_units": sorted(u for u in self.done if u), "device": self.device,
                  "sec_per_step": self.sec_per_step, "sec_per_eval": self.sec_per_eval}
        atomic_write_text(self.out / "status.json", json.dumps(status, indent=1) + "\n")

    def fits(self, unit: str, estimate: float) -> bool:
        if self.deadline is None:
            return True
        left = Deadline(self.deadline).left() - float(self.r["deadline_margin_s"])
        if estimate > left:
            _log(f"skip {unit}: estimated {estimate:.0f}s > {max(left, 0):.0f}s left before the deadline")
            self.skipped.append({"unit": unit, "estimate_s": round(estimate, 1), "left_s": round(left, 1)})
            self.save()
            return False
        return True

    def model_name(self) -> str:
        return self.r["display_name"] or display_name(self.r["model"])

    def task_data(self, task: str):
        if task not in self.data:
            self.data[task] = load_task(self.r, task)
        return self.data[task]

    def fresh(self):
        """A copy of the pretrained classifier (loaded once)."""
        if self.base is None:
            self.base, self.tok = _load_base(self.r)
        torch.manual_seed(self.r["seed"])
        return copy.deepcopy(self.base)

    def evaluate(self, model, task: str) -> dict:
        _, dev, _ = self.task_data(task)
        t = time.time()
        res = evaluate_classification(model, self.tok, dev, task, batch_size=self.r["eval_batch_size"],
                                      max_length=self.r["seq_len"], device=self.device, progress=False)
        dt = time.time() - t
        self.sec_per_eval = dt if self.sec_per_eval is None else max(0.5 * self.sec_per_eval + 0.5 * dt, 1e-3)
        return res

    def record(self, unit: str, task: str, method: str, res: dict, *, variant: str | None = None,
               train_steps: int = 0, **extra) -> dict:
        train, dev, sub = self.task_data(task)
        rec = {"unit": unit, "task": task, "method": method, "variant": variant, "s_ffn": float(res["s_ffn"]),
               "metric": PRIMARY[task], "value": float(res[PRIMARY[task]]), "accuracy": float(res["accuracy"]),
               "f1": res.get("f1"), "mcc": res.get("mcc"), "tau": None, "eval_examples": int(res["examples"]),
               "train_examples": len(train), "train_subsampled": sub, "train_steps": int(train_steps),
               "batch_size": self.r["batch_size"], "seq_len": self.r["seq_len"], "seed": self.r["seed"],
               "finetune_steps": int(self.r["dense"]["steps"]), "model": self.model_name(),
               "precision": self.r["precision"], "device": self.device,
               "mean_active": res.get("mean_active"), "per_layer_s_ffn": res.get("per_layer_s_ffn") or None,
               "eval_data": f"{task}/{TASK_FILES[task][1]}", "train_data": f"{task}/{TASK_FILES[task][0]}",
               "recipe": self.r["source"] or self.r["name"]}
        rec.update(extra)
        return rec

    def commit(self, unit: str, recs: list[dict]) -> None:
        self.records = [x for x in self.records if x.get("unit") != unit] + recs
        self.done.add(unit)
        self.save()
        for x in recs:
            tau = f" tau={x['tau']}" if x.get("tau") is not None else ""
            _log(f"  {x['task']:5s} {x['method']:16s} {str(x.get('variant') or ''):10s} s_ffn={x['s_ffn']:.3f} "
                 f"{x['metric']}={x['value']:.4f}{tau}")

    # ---- training
    def _train(self, model, task: str, method: str, steps1: int, steps2: int, **kw):
        train_data, _, _ = self.task_data(task)
        ds = encode_classification(train_data.texts, train_data.labels, self.tok, self.r["seq_len"])
        cfg = TrainConfig(model=self.r["model"], task="classify", method=method, stage1_steps=steps1,
                          stage2_steps=steps2, batch_size=self.r["batch_size"], seq_len=self.r["seq_len"],
                          precision=self.r["precision"], device=self.device, seed=self.r["seed"],
                          progress=self.progress, neurons_per_expert=self.r["neurons_per_expert"], **kw)
        t = time.time()
        res = train(model, self.tok, ds, cfg)
        _unwrap_autocast(model)
        model.eval()
        dt = time.time() - t
        self.sec_per_step[method] = dt / max(steps1 + steps2, 1)
        return res, dt

    def has_finetuned(self, task: str) -> bool:
        """Whether the task's fine-tuned dense weights exist (this run, or saved by an earlier one)."""
        return task in self.finetuned or (self.out / "finetuned" / task / "model.safetensors").exists()

    def finetuned_model(self, task: str):
        """The dense model fine-tuned on ``task`` (trained once, kept in memory and under OUT/finetuned)."""
        if task in self.finetuned:
            m = self.fresh()
            m.load_state_dict(self.finetuned[task])
            return m
        d = self.r["dense"]
        saved = self.out / "finetuned" / task
        m = self.fresh()
        if (saved / "model.safetensors").exists():
            from safetensors.torch import load_file

            m.load_state_dict(load_file(str(saved / "model.safetensors")))
        else:
            res, dt = self._train(m, task, "dense", int(d["steps"]), 0, lr_backbone=float(d["lr"]),
                                  lr_head=d["lr_head"], lr_scheduler=d["lr_scheduler"],
                                  warmup_steps=int(d["warmup_steps"]))
            if self.r["keep_finetuned"]:
                self._save_finetuned(m, saved)
        m.to("cpu")
        self.finetuned[task] = {k: v.detach().clone() for k, v in m.state_dict().items()}
        return m

    def _save_finetuned(self, model, saved: Path) -> None:
        import shutil

        from safetensors.torch import save_file

        tmp = saved.with_name(f".{saved.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(tmp / "model.safetensors"))
        if saved.exists():
            shutil.rmtree(saved)
        tmp.rename(saved)

    def est_train(self, kind: str, steps: int) -> float:
        """Seconds a training unit of ``kind`` should take: the last measured rate of that kind, else the dense
        rate × 1.6 (routing), else 0.05 s/step."""
        if kind in self.sec_per_step:
            sps, factor = self.sec_per_step[kind], 1.15
        else:
            sps, factor = self.sec_per_step.get("dense", 0.05), (1.0 if kind == "dense" else 1.6)
        return steps * sps * factor + 5.0

    def est_eval(self, n: int) -> float:
        return n * (self.sec_per_eval if self.sec_per_eval is not None else 2.0)

    # ---- phases
    def phase_dense(self, task: str) -> None:
        unit = f"{task}/dense"
        if unit in self.done:
            return
        steps = int(self.r["dense"]["steps"])
        if task not in self.finetuned and not self.fits(unit, self.est_train("dense", steps) + self.est_eval(1) + 10):
            return
        _log(f"{task}: dense fine-tuning ({steps} steps)")
        m = self.finetuned_model(task)
        res = self.evaluate(m, task)
        self.commit(unit, [self.record(unit, task, "dense-finetuned", res, variant="finetuned", train_steps=steps,
                                       lr=self.r["dense"]["lr"])])

    def _prunepath(self, task: str, variant: str) -> None:
        unit = f"{task}/prunepath" if variant == "finetuned" else f"{task}/ablation"
        if unit in self.done or not self.has_finetuned(task):
            return
        p = self.r["prunepath"]
        steps = int(p["stage1_steps"]) + int(p["stage2_steps"])
        if not self.fits(unit, self.est_train("prunepath", steps) + self.est_eval(len(self.r["taus"]) + 1)):
            return
        _log(f"{task}: PrunePath, experts clustered from the {variant} weights ({steps} steps)")
        m = self.finetuned_model(task)
        if variant == "finetuned":
            prunepath.moefy(m, neurons_per_expert=self.r["neurons_per_expert"], seed=self.r["seed"],
                            progress=False)
        else:
            if self.pretrained_perms is None:
                self.pretrained_perms = cluster_permutations(self.fresh(), self.r["neurons_per_expert"],
                                                             self.r["seed"])
            prunepath.moefy(m, neurons_per_expert=self.r["neurons_per_expert"], seed=self.r["seed"],
                            clustering="kmeans-pretrained", permutations=self.pretrained_perms, progress=False)
        kw = {k: p[k] for k in p if k not in ("stage1_steps", "stage2_steps")}
        tr, dt = self._train(m, task, "prunepath", int(p["stage1_steps"]), int(p["stage2_steps"]), **kw)
        info = {"train_s": round(dt, 1), "tau_min": float(p["tau_min"]), "clustering": variant,
                "num_experts": state_of(m).config.num_experts}
        recs = []
        prunepath.configure(m, tau=float(p["tau_min"]))
        res = self.evaluate(m, task)
        recs.append(self.record(unit, task, "prunepath", res, variant=variant, train_steps=steps,
                                **{**info, "tau": float(p["tau_min"])}))
        for t in self.r["taus"]:
            prunepath.configure(m, tau=float(t))
            res = self.evaluate(m, task)
            recs.append(self.record(unit, task, "prunepath-sweep", res, variant=variant, train_steps=steps,
                                    **{**info, "tau": float(t)}))
        self.commit(unit, recs)

    def phase_lte(self, task: str) -> None:
        unit = f"{task}/lte"
        if unit in self.done or not self.has_finetuned(task):
            return
        p = self.r["lte"]
        steps = int(p["stage1_steps"]) + int(p["stage2_steps"])
        if not self.fits(unit, self.est_train("lte", steps) + self.est_eval(len(p["thresholds"]))):
            return
        _log(f"{task}: LTE (eta={p['eta']}, {steps} steps)")
        m = self.finetuned_model(task)
        prunepath.moefy(m, neurons_per_expert=self.r["neurons_per_expert"], seed=self.r["seed"], progress=False)
        params = {"eta": float(p["eta"])}
        if "sep_weight" in p:
            params["sep_weight"] = float(p["sep_weight"])
        kw = {k: p[k] for k in ("lr_backbone", "lr_router", "lr_scheduler", "warmup_steps") if k in p}
        tr, dt = self._train(m, task, "lte", int(p["stage1_steps"]), int(p["stage2_steps"]), method_params=params,
                             **kw)
        recs = []
        for d in p["thresholds"]:
            prunepath.configure(m, method="lte", params={"soft": False, "threshold": float(d)})
            res = self.evaluate(m, task)
            recs.append(self.record(unit, task, "lte", res, variant=f"eta={p['eta']}", train_steps=steps,
                                    threshold=float(d), eta=float(p["eta"]), train_s=round(dt, 1)))
        self.commit(unit, recs)

    def phase_wanda(self, task: str) -> None:
        unit = f"{task}/wanda"
        if unit in self.done or not self.has_finetuned(task):
            return
        sp = [float(s) for s in self.r["wanda"]["sparsities"]]
        if not self.fits(unit, self.est_eval(len(sp)) + 5.0):
            return
        _log(f"{task}: Wanda at {sp}")
        train, _, _ = self.task_data(task)
        calib = [a + (" " + b if b else "") for a, b in train.texts]
        norms = None
        recs = []
        for s in sp:
            m = self.finetuned_model(task).to(self.device)
            out = wanda.apply_wanda(m, self.tok, calib, s, max_tokens=int(self.r["wanda"]["calib_tokens"]),
                              seq_len=self.r["seq_len"], progress=False, norms=norms)
            norms = out["norms"]
            res = self.evaluate(m, task)
            recs.append(self.record(unit, task, "wanda", res, variant="ffn-unstructured",
                                    train_steps=int(self.r["dense"]["steps"]), wanda_sparsity=s,
                                    calib_tokens=int(self.r["wanda"]["calib_tokens"]),
                                    s_ffn_kind="weights (unstructured)"))
            del m
        self.commit(unit, recs)


def units(r: dict, st: Study) -> list[Job]:
    """The study's units (``<task>/<phase>``) in priority order, as jobs of one chain."""
    def unit(name: str, fn, *args) -> Job:
        return Job(name, "nlu", fn, args={"args": args})

    tasks, phases = r["tasks"], r["phases"]
    jobs = []
    for task in tasks:  # priority 1: dense + PrunePath everywhere
        jobs.append(unit(f"{task}/dense", st.phase_dense, task))
        if "prunepath" in phases:
            jobs.append(unit(f"{task}/prunepath", st._prunepath, task, "finetuned"))
    for task in tasks:  # priority 2: the baselines
        if "lte" in phases:
            jobs.append(unit(f"{task}/lte", st.phase_lte, task))
        if "wanda" in phases:
            jobs.append(unit(f"{task}/wanda", st.phase_wanda, task))
    if "ablation" in phases:  # priority 3: clustering from the pretrained weights
        jobs += [unit(f"{task}/ablation", st._prunepath, task, "pretrained") for task in tasks]
    return jobs


def run(recipe: dict, *, progress: bool = True, deadline: float | None = None) -> dict:
    """Run the NLU study of ``recipe`` (see :data:`DEFAULTS`); ``deadline`` is an absolute ``time.time()``
    after which no unit is started whose estimated time does not fit. Returns {"records", "out", "skipped",
    "failed", "summary"} (summary: the markdown tables)."""
    r = validate_recipe(recipe)
    out = Path(r["out"]).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    st = Study(r, out, progress, deadline)
    _log(f"device {st.device}, tasks {r['tasks']}, phases {r['phases']}, out {out}"
         + (f", {deadline - time.time():.0f}s to the deadline" if deadline else ""))
    st.save()

    def on_error(job: Job, exc: Exception) -> str:
        if not r["continue_on_error"]:
            raise
        import traceback

        _log(f"unit {job.id} FAILED: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        st.failed.append({"unit": job.id, "error": f"{type(exc).__name__}: {exc}"})
        st.save()
        return f"{job.id} (FAILED)"

    # Each phase skips its unit itself when it is done or does not fit the deadline (it needs the unit's own
    # time estimate), so the engine only runs them in order and keeps a failing one from stopping the rest.
    run_jobs(units(r, st), is_done=lambda unit: False, execute=lambda job: job.fn(*job.args["args"]),
             on_error=on_error)
    st.save()
    summary = render_markdown(st.records)
    _log(f"done in {time.time() - st.t0:.0f}s: {len(st.records)} records, {len(st.skipped)} unit(s) skipped")
    return {"records": st.records, "out": str(out), "skipped": st.skipped, "failed": st.failed, "summary": summary}


def run_recipe_file(recipe: str | Path, *, device: str | None = None, out: str | None = None,
                    display_name: str | None = None, data_dir: str | None = None, deadline_s: float | None = None,
                    progress: bool = True) -> dict:
    """Run the NLU study of the recipe file ``recipe`` (YAML/JSON, ``study: nlu``) with the given settings
    overriding the recipe's (``None``: keep the recipe's); ``deadline_s`` is seconds from now (see :func:`run`).
    Returns what :func:`run` returns."""
    loaded = load_recipe(str(recipe))
    loaded.setdefault("source", str(recipe))
    if device:
        loaded["device"] = device
    for key, value in (("out", out), ("display_name", display_name), ("data_dir", data_dir)):
        if value:
            loaded[key] = value
    deadline = time.time() + deadline_s if deadline_s else None
    return run(loaded, progress=progress, deadline=deadline)


# ---- report --------------------------------------------------------------------------------------------------------
def read_records(path: str | Path) -> list[dict]:
    """The record list of a study (``OUT/nlu-minilm.json``), for :func:`render_markdown` / :func:`plot_records`."""
    return json.loads(Path(path).read_text())


if __name__ == "__main__":  # the command line moved to `prunepath nlu-study` (prunepath.cli.nlu_study)
    sys.exit("python -m prunepath.pipeline.nlu_study moved: run `prunepath nlu-study` (same options)")
