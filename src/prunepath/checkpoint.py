"""Saving and loading converted models: a ``save_pretrained``-style directory (config.json, model.safetensors,
tokenizer files) plus ``prunepath_config.json`` (expert layout and routing settings)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from prunepath.conversion.moefy import PrunePathConfig, install_structure
from prunepath.errors import PrunePathError

CONFIG_NAME = "prunepath_config.json"
WEIGHTS_NAME = "model.safetensors"


def atomic_replace_dir(staging: Path, final: Path) -> None:
    """Move a completed ``staging`` directory to ``final``; an old PrunePath checkpoint there is replaced only
    after the new one is complete. Any other existing non-empty directory is left untouched (error)."""
    if final.exists():
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        elif final.is_dir() and (final / CONFIG_NAME).exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            staging.rename(final)
            shutil.rmtree(old, ignore_errors=True)
            return
        else:
            raise PrunePathError(f"{final} exists and is not a PrunePath checkpoint; choose another output path "
                                 "(PrunePath never overwrites other files)")
    staging.rename(final)


def save(model: nn.Module, path: str | os.PathLike, tokenizer=None, *, extra: dict | None = None) -> Path:
    """Save a converted model to ``path`` (written to a temporary directory, renamed when complete)."""
    from safetensors.torch import save_model

    cfg: PrunePathConfig | None = getattr(model, "prunepath_config", None)
    if cfg is None:
        raise PrunePathError("only converted models can be saved with prunepath.save; call prunepath.moefy(model) "
                             "first (or use model.save_pretrained for a dense model)")
    final = Path(path).expanduser().resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        model.config.save_pretrained(staging)
        save_model(model, str(staging / WEIGHTS_NAME), metadata={"format": "pt", "prunepath": "1"})
        meta = cfg.to_dict()
        meta["model_class"] = type(model).__name__
        meta["source_display_name"] = getattr(model, "prunepath_display_name", None)
        if extra:
            meta["extra"] = extra
        (staging / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        tokenizer = tokenizer if tokenizer is not None else getattr(model, "prunepath_tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        atomic_replace_dir(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def read_config(path: str | os.PathLike) -> dict:
    """The raw ``prunepath_config.json`` of a checkpoint, with clear errors for anything else."""
    root = Path(path).expanduser()
    if not root.exists():
        raise PrunePathError(f"no such checkpoint directory: {root}")
    if not root.is_dir() or not (root / CONFIG_NAME).exists():
        raise PrunePathError(f"{root} is not a PrunePath checkpoint (no {CONFIG_NAME}); create one with "
                             "`prunepath convert --model NAME --out DIR` or prunepath.save(model, DIR)")
    try:
        return json.loads((root / CONFIG_NAME).read_text())
    except json.JSONDecodeError as exc:
        raise PrunePathError(f"{root / CONFIG_NAME} is corrupt ({exc}); re-create the checkpoint") from exc


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, device=None) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)`` from a PrunePath checkpoint directory; the tokenizer is None if not saved."""
    import transformers
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoTokenizer

    root = Path(path).expanduser()
    meta = read_config(root)
    try:
        pcfg = PrunePathConfig.from_dict({k: v for k, v in meta.items()
                                          if k not in ("model_class", "source_display_name", "extra")})
        model_cls = getattr(transformers, meta["model_class"])
        config = AutoConfig.from_pretrained(root)
    except (KeyError, TypeError, AttributeError, ValueError, OSError) as exc:
        raise PrunePathError(f"{root} has an unreadable PrunePath config ({exc}); re-create the checkpoint") from exc
    weights = root / WEIGHTS_NAME
    if not weights.exists():
        raise PrunePathError(f"{root} has no {WEIGHTS_NAME}: the checkpoint is incomplete")
    model = model_cls._from_config(config, dtype=torch.float32)
    install_structure(model, pcfg)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise PrunePathError(f"{weights} is corrupt or does not match its config ({str(exc)[:200]}); "
                             "re-create the checkpoint") from exc
    if missing or unexpected:
        raise PrunePathError(f"{weights} does not match its config (missing {sorted(missing)[:3]}, unexpected "
                             f"{sorted(unexpected)[:3]}); the checkpoint is corrupt or mixed")
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    model.eval()
    tok = None
    if any((root / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        tok = AutoTokenizer.from_pretrained(root)
    model.prunepath_tokenizer = tok
    model.prunepath_display_name = meta.get("source_display_name")
    model.prunepath_source = str(root)
    return model, tok
