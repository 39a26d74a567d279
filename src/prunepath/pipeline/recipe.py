"""The run recipe: one YAML/JSON file that names a model, an optional training, an evaluation and a τ sweep.

    name: quickstart
    model: smollm2-135m
    out: runs/quickstart            # relative to the current directory
    convert: {neurons_per_expert: 32, seed: 0}
    train: {...}                    # prunepath.training.TrainConfig keys; omit to sweep the untrained model
    evaluation: {task: ppl, data: wikitext-2/wiki.valid.raw, max_tokens: 16384, window: 512}
    sweep: {taus: [1.05, 0.9, 0.8, 0.7], dense: true, summary_sparsities: [0.2, 0.35, 0.5]}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from prunepath.errors import PrunePathError
from prunepath.models.registry import DEFAULT_MODEL
from prunepath.errors import unknown_names_message
from prunepath.evaluation.sweep import validate_taus
from prunepath.training.config import TrainConfig
from prunepath.routing.config import TAU_ALL

EVALUATION_KEYS = ("task", "data", "max_tokens", "window", "stride", "batch_size")
SWEEP_KEYS = ("taus", "dense", "summary_sparsities", "teal", "teal_calib_tokens")


@dataclass
class Recipe:
    name: str
    model: str = DEFAULT_MODEL
    out: str | None = None
    convert: dict = field(default_factory=lambda: {"neurons_per_expert": 32, "seed": 0})
    train: dict | None = None
    evaluation: dict = field(default_factory=lambda: {"task": "ppl", "data": "wikitext-2/wiki.valid.raw",
                                                      "max_tokens": 16384, "window": 512})
    sweep: dict = field(default_factory=lambda: {"taus": [TAU_ALL, 0.9, 0.8, 0.7, 0.6, 0.5], "dense": True})
    description: str = ""
    source: str | None = None  # the file it came from

    def __post_init__(self) -> None:
        for section, value, allowed in (("evaluation", self.evaluation, EVALUATION_KEYS),
                                        ("sweep", self.sweep, SWEEP_KEYS)):
            if not isinstance(value, dict):
                raise PrunePathError(f"recipe {section} must be a mapping of settings ({', '.join(allowed)})")
            unknown = sorted(set(value) - set(allowed))
            if unknown:
                raise PrunePathError(f"recipe {section}: " + unknown_names_message(unknown, allowed))
        if self.evaluation.get("task", "ppl") != "ppl":
            raise PrunePathError("run recipes support evaluation task 'ppl' for now; use `prunepath sweep` for "
                                 "classification / ROUGE sweeps")
        validate_taus(self.sweep.get("taus") or [])
        for s in self.sweep.get("summary_sparsities", []):
            if not 0 <= float(s) < 1:
                raise PrunePathError(f"summary_sparsities must be in [0, 1) (got {s})")
        for s in self.sweep.get("teal", []) or []:
            if not 0 < float(s) < 1:
                raise PrunePathError(f"sweep.teal: every target sparsity must be in (0, 1) (got {s})")
        unknown = set(self.convert) - {"neurons_per_expert", "num_experts", "seed", "clustering"}
        if unknown:
            raise PrunePathError("recipe convert: " + unknown_names_message(
                sorted(unknown), ["neurons_per_expert", "num_experts", "seed", "clustering"]))
        if self.train is not None:
            self.train_config()  # validates the training settings now, not after an hour of work

    @property
    def out_dir(self) -> Path:
        return Path(self.out or os.path.join("runs", self.name)).expanduser().resolve()

    def train_config(self):
        settings = {"model": self.model, "neurons_per_expert": self.convert.get("neurons_per_expert", 32),
                    "num_experts": self.convert.get("num_experts"), "clustering": self.convert.get("clustering",
                                                                                                 "kmeans"),
                    **(self.train or {})}
        settings["out"] = str(self.out_dir / "model")
        return TrainConfig.from_dict(settings, where=f"{self.source or 'recipe'}: train")


def read_recipe_mapping(path: str | os.PathLike) -> dict:
    """The raw top-level mapping of a YAML / JSON recipe, with clear errors."""
    import yaml

    p = Path(path).expanduser()
    if not p.exists():
        raise PrunePathError(f"recipe not found: {p} (the recipes shipped with PrunePath are in recipes/)")
    try:
        raw = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise PrunePathError(f"{p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {exc}") from exc
    if not isinstance(raw, dict):
        raise PrunePathError(f"{p} must hold a mapping of settings (name, model, train, evaluation, sweep)")
    return raw


def load_run_recipe(path: str | os.PathLike, overrides: dict | None = None) -> Recipe:
    """Read a run recipe (YAML or JSON); unknown top-level keys are rejected by name."""
    p = Path(path).expanduser()
    raw = read_recipe_mapping(p)
    if "study" in raw:
        raise PrunePathError(f"{p} is a study recipe (study: {raw['study']}); run it with `prunepath run {p}`")
    raw = {**raw, **(overrides or {})}
    known = {f.name for f in fields(Recipe)} - {"source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise PrunePathError(f"{p}: {unknown_names_message(unknown, sorted(known), 'recipe key')}")
    raw.setdefault("name", p.stem)
    return Recipe(**raw, source=str(p))
