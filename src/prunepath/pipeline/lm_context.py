"""The LM study's configuration helpers and run context (its deadline and job files, on the engine of
:mod:`prunepath.pipeline.jobs`); see :mod:`prunepath.pipeline.lm_study`."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from prunepath.state import state_of
from prunepath.stats import router_byte_fraction
from prunepath.calibration import calibration_texts
from prunepath.data.corpora import is_corpus_name
from prunepath.data.text import load_texts
from prunepath.evaluation.common import resolve_data_path
from prunepath.evaluation.perplexity import tokenize_text
from prunepath.pipeline.jobs import (  # noqa: F401  (re-exported: the study's names stay importable here)
    Deadline, DeadlineReached, Job, chains_of, parse_shard, read_rows, require, rewrite_rows, select_jobs,
    shard_jobs)
from prunepath.training.config import TrainConfig, load_recipe
import prunepath
from prunepath.evaluation import perplexity

STUDY_KEYS = {"study", "name", "description", "model", "out", "seed", "train_tokens", "train", "stage1_fraction",
              "variants", "tau_min_runs", "lte", "evaluation", "sweep_taus", "near_tau", "baselines",
              "generation", "topk", "density", "device", "min_job_s",
              "save_margin_s", "min_train_s", "results_tag", "jobs", "activation", "allocation"}


# variant keys read by the evaluation of a run trained with in-expert sparsity: the fractions and the τ values of
# its (τ, fraction, allocation) grid
INNER_EVAL_KEYS = ("inner_targets", "inner_taus", "inner_allocations")


def _log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- configuration -------------------------------------------------------------------------------------------
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
        for key in INNER_EVAL_KEYS:  # evaluation settings of the variant, not training ones
            var.pop(key, None)
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


# ---- the run context -----------------------------------------------------------------------------------------
class Context:
    def __init__(self, cfg: dict, out: Path, device: str, deadline: float | None, progress: bool) -> None:
        self.cfg, self.out, self.device, self.deadline, self.progress = cfg, out, device, deadline, progress
        self.clock = Deadline(deadline)
        self._ids = None
        self._calib = None
        self._display = None

    # time (the engine's Deadline)
    def left(self) -> float:
        return self.clock.left()

    def check(self, need: float = 0.0) -> None:
        require(self.left(), need)  # through left(): tests move the clock by replacing it

    # files
    def job_file(self, job_id: str) -> Path:
        return self.out / "jobs" / f"{job_id}.json"

    def done(self, job_id: str) -> bool:
        return self.job_file(job_id).exists()

    def partial(self, job_id: str) -> list[dict]:
        return read_rows(self.out / "partial" / f"{job_id}.jsonl")

    def add_partial(self, job_id: str, row: dict) -> None:
        rewrite_rows(self.out / "partial" / f"{job_id}.jsonl", self.partial(job_id) + [row])

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
        self._display = state_of(model).display_name or str(self.cfg["model"])
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
        state_of(model).display_name = self.display()
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


ACTIVATION_JOBS = {"teal": ("teal", "uniform"), "teal-block": ("teal", "block"), "teal-greedy": ("teal", "greedy"),
                   "cats": ("cats", None)}


def _small(obj):
    """Calibration info without big per-token lists."""
    if isinstance(obj, dict):
        return {k: _small(v) for k, v in obj.items()}
    if isinstance(obj, list) and len(obj) > 64:
        return f"[{len(obj)} values]"
    return obj



def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}



def _structure(model) -> dict:
    """Expert size, the router's share of the FFN bytes and whether experts are gated (ungated, a τ > 1 point
    reads no router), for the records."""
    cfg = state_of(model).config
    return {"neurons_per_expert": int(cfg.neurons_per_expert), "num_experts": int(cfg.num_experts),
            "router_bytes_frac": round(router_byte_fraction(model), 6), "gates": bool(cfg.routing.gates)}
