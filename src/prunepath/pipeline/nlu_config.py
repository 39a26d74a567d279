"""The NLU study's settings: task files, defaults, and the recipe check (see :mod:`prunepath.pipeline.nlu_study`)."""

from __future__ import annotations

import copy

from prunepath.errors import PrunePathError
from prunepath.data.glue import TASKS
from prunepath.routing.config import TAU_ALL


TASK_FILES = {"sst2": ("stsa.binary.train", "stsa.binary.dev"), "mrpc": ("train.tsv", "dev.tsv"),
              "rte": ("train.tsv", "dev.tsv"), "cola": ("in_domain_train.tsv", "in_domain_dev.tsv")}
PRIMARY = {"sst2": "accuracy", "mrpc": "f1", "rte": "accuracy", "cola": "mcc"}
PHASES = ("dense", "prunepath", "lte", "wanda", "ablation")
RECORDS_NAME = "nlu-minilm.json"

DEFAULTS: dict = {
    "study": "nlu",
    "name": None,  # set by `prunepath run` (the recipe's file name)
    "source": None,  # set by `prunepath run` (the recipe's path)
    "model": "minilm-l6",
    "display_name": None,  # what records call the model (default: the registry's display name)
    "data_dir": None,  # default: $DATA_DIR, else the shared data folder
    "out": "runs/study-nlu-minilm",
    "results": None,  # optional extra copy of the record list (e.g. docs/results/nlu-minilm.json)
    "device": "auto",
    "precision": "fp32",
    "seed": 0,
    "tasks": ["sst2", "mrpc", "rte", "cola"],
    "phases": list(PHASES),
    "max_train_examples": None,  # int or {task: int}: a seeded subsample of the training set
    "max_eval_examples": None,  # int: first N dev examples (None: the whole dev set)
    "seq_len": 128,
    "batch_size": 32,
    "eval_batch_size": 128,
    "neurons_per_expert": 32,
    "dense": {"steps": 300, "lr": 1e-4, "lr_head": 1e-3, "lr_scheduler": "linear", "warmup_steps": 30},
    "prunepath": {"stage1_steps": 100, "stage2_steps": 200, "tau_min": 0.6, "lr_backbone": 3e-5,
                  "lr_router": 1e-3},
    "lte": {"stage1_steps": 150, "stage2_steps": 150, "lr_backbone": 3e-5, "lr_router": 1e-3, "eta": 0.01,
            "thresholds": [0.3, 0.5, 0.7, 0.8, 0.9]},
    "taus": [TAU_ALL, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3],
    "wanda": {"sparsities": [0.3, 0.5, 0.6, 0.7, 0.8], "calib_tokens": 8192},
    "deadline_margin_s": 10.0,
    "keep_finetuned": True,
    "continue_on_error": True,  # a failing unit is logged (status.json "failed") and the study goes on
}
_TRAIN_KEYS = {"prunepath": ("stage1_steps", "stage2_steps", "tau_min", "lr_backbone", "lr_router", "eta", "lam",
                             "gamma", "tau_start", "tau_warmup", "tau_schedule", "lr_scheduler", "warmup_steps"),
               "lte": ("stage1_steps", "stage2_steps", "lr_backbone", "lr_router", "eta", "thresholds",
                       "sep_weight", "lr_scheduler", "warmup_steps"),
               "dense": ("steps", "lr", "lr_head", "lr_scheduler", "warmup_steps"),
               "wanda": ("sparsities", "calib_tokens")}


def _numbers(name: str, value) -> list[float]:
    if not isinstance(value, (list, tuple)):
        raise PrunePathError(f"NLU recipe: {name} must be a list of numbers (got {value!r})")
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError) as exc:
        raise PrunePathError(f"NLU recipe: {name} must be a list of numbers (got {value!r})") from exc


def validate_recipe(recipe: dict) -> dict:
    """The recipe merged over :data:`DEFAULTS`, checked; unknown keys and bad values raise PrunePathError."""
    if not isinstance(recipe, dict):
        raise PrunePathError("the NLU recipe must be a mapping of setting: value")
    unknown = sorted(set(recipe) - set(DEFAULTS))
    if unknown:
        raise PrunePathError(f"NLU recipe: unknown setting(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    if recipe.get("study", "nlu") != "nlu":
        raise PrunePathError(f"NLU recipe: study must be 'nlu' (got {recipe['study']!r})")
    r = copy.deepcopy(DEFAULTS)
    for k, v in recipe.items():
        if k in _TRAIN_KEYS and v is not None:
            if not isinstance(v, dict):
                raise PrunePathError(f"NLU recipe: {k} must be a mapping (keys: {', '.join(_TRAIN_KEYS[k])})")
            bad = sorted(set(v) - set(_TRAIN_KEYS[k]))
            if bad:
                raise PrunePathError(f"NLU recipe: {k}: unknown key(s) {', '.join(bad)}; known: "
                                     f"{', '.join(_TRAIN_KEYS[k])}")
            r[k].update(v)
        else:
            r[k] = v

    if not r["tasks"] or any(t not in TASKS for t in r["tasks"]):
        raise PrunePathError(f"NLU recipe: tasks must be a non-empty list from {', '.join(TASKS)} (got {r['tasks']})")
    if not r["phases"] or any(p not in PHASES for p in r["phases"]):
        raise PrunePathError(f"NLU recipe: phases must be a non-empty list from {', '.join(PHASES)} "
                             f"(got {r['phases']})")
    if "dense" not in r["phases"]:
        raise PrunePathError("NLU recipe: phases must include 'dense' (every method starts from the fine-tuned model)")
    r["taus"] = taus = _numbers("taus", r["taus"])
    if not taus or any(t <= 0 for t in taus):
        raise PrunePathError(f"NLU recipe: taus must be a non-empty list of positive numbers (got {r['taus']})")
    r["wanda"]["sparsities"] = _numbers("wanda.sparsities", r["wanda"]["sparsities"])
    r["lte"]["thresholds"] = _numbers("lte.thresholds", r["lte"]["thresholds"])
    for s in r["wanda"]["sparsities"]:
        if not 0 <= float(s) < 1:
            raise PrunePathError(f"NLU recipe: wanda sparsities must be in [0, 1) (got {s})")
    for d in r["lte"]["thresholds"]:
        if not 0 < float(d) < 1:
            raise PrunePathError(f"NLU recipe: lte thresholds must be in (0, 1) (got {d})")
    for k in ("seq_len", "batch_size", "eval_batch_size", "neurons_per_expert"):
        if not isinstance(r[k], int) or r[k] < 1:
            raise PrunePathError(f"NLU recipe: {k} must be a positive integer (got {r[k]!r})")
    if int(r["dense"]["steps"]) < 1:
        raise PrunePathError("NLU recipe: dense.steps must be >= 1")
    mte = r["max_train_examples"]
    if mte is not None and not isinstance(mte, (int, dict)):
        raise PrunePathError("NLU recipe: max_train_examples must be an integer or a {task: integer} mapping")
    if r["precision"] not in ("fp32", "bf16", "fp16", "no"):
        raise PrunePathError(f"NLU recipe: precision must be fp32, bf16 or fp16 (got {r['precision']!r})")
    if r["device"] not in ("auto", "cpu") and not str(r["device"]).startswith("cuda"):
        raise PrunePathError(f"NLU recipe: device must be auto, cpu or cuda (got {r['device']!r})")
    return r
