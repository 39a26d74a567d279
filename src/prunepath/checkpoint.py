"""Saving and loading converted models: a ``save_pretrained``-style directory (config.json, model.safetensors,
tokenizer files) plus ``prunepath_config.json`` (expert layout and routing settings), and for gated-FFN models
``prunepath_hf.py``, which lets plain ``transformers`` load the checkpoint (``trust_remote_code=True``).

What a save guarantees (docs/training.md, "Guarantees"):

* Atomic: everything is written into a temporary sibling directory (``.NAME.tmp-PID-…``), flushed to disk, and
  then swapped in with one rename (``renameat2(RENAME_EXCHANGE)`` where the kernel has it), so a process killed at
  any point leaves either the previous checkpoint or the new one at NAME, never a mixture. ``prunepath_config.json``
  (the marker that makes a directory a checkpoint) is the last file written; leftover temporary directories are
  refused by :func:`load` and removed by the next save to the same path.
* File modes follow the umask like every other output (0755 directories, 0644 files under umask 022).
* ``model.safetensors`` carries a SHA-256 in ``prunepath_config.json``; :func:`load` checks it, so a truncated or
  corrupted file is a clear error, not wrong numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn

from prunepath.conversion.moefy import PrunePathConfig, install_structure
from prunepath.errors import PrunePathError
from prunepath.io import (  # noqa: F401  (re-exported: the atomic directory replacement lives in io)
    current_umask, apply_default_modes, _fsync_path, _fsync_tree, _exchange, atomic_replace_dir, _pid_alive, _remove_stale_temporaries)
from prunepath._version import __version__
from prunepath.conversion.moefy import prunepath_modules
from prunepath.state import state_of
from prunepath.models.loading import apply_attention_override

CONFIG_NAME = "prunepath_config.json"
WEIGHTS_NAME = "model.safetensors"
REMOTE_CODE_NAME = "prunepath_hf.py"
FORMAT_VERSION = 1  # the newest prunepath_config.json format this code reads (PrunePathConfig.format_version)
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp(-.*)?|old-\d+)$")  # .NAME.tmp-…, .NAME.tmp, .NAME.old-PID
# The model classes whose checkpoints get prunepath_hf.py, by class-name suffix: the transformers auto class.
REMOTE_AUTO_CLASSES = {"ForCausalLM": "AutoModelForCausalLM",
                       "ForSequenceClassification": "AutoModelForSequenceClassification",
                       "Model": "AutoModel"}


# ---- plain-transformers loading ----------------------------------------------------------------------------
def remote_code_support(model: nn.Module, cfg: PrunePathConfig) -> tuple[str, str] | str:
    """``(auto class, base class name)`` when plain transformers can load this model through prunepath_hf.py,
    else the reason it cannot (a string)."""
    import transformers


    cls = type(model).__name__
    if cfg.adapter != "gated-mlp":
        return f"the {cfg.adapter} architecture (only gated-FFN models: Llama, Mistral, Qwen2/3, Gemma 1-3)"
    if cfg.routing.method != "prunepath" or cfg.router != "linear":
        return f"routing method {cfg.routing.method!r} with router {cfg.router!r} (only PrunePath's own routing)"
    auto = next((a for suffix, a in REMOTE_AUTO_CLASSES.items() if cls.endswith(suffix)), None)
    if auto is None or getattr(transformers, cls, None) is not type(model):
        return f"model class {cls} (only transformers' *ForCausalLM / *ForSequenceClassification / *Model)"
    if not all(f.gated and f.router.__class__ is nn.Linear and isinstance(f.dropout, nn.Identity)
               for f in prunepath_modules(model)):
        return "FFNs with a non-standard router or dropout"
    return auto, cls


def _remote_code_source(base_class: str) -> str:
    src = (Path(__file__).with_name("hf_remote.py")).read_text(encoding="utf-8")
    line = 'BASE_CLASS = "LlamaForCausalLM"'
    if src.count(line) != 1:
        raise PrunePathError("prunepath/hf_remote.py lost its BASE_CLASS line; the installation is damaged")
    return src.replace(line, f"BASE_CLASS = {base_class!r}")


def _write_hf_config(model: nn.Module, cfg: PrunePathConfig, staging: Path) -> None:
    """config.json, plus (when supported) the ``auto_map`` and ``prunepath`` entries and prunepath_hf.py."""
    model.config.save_pretrained(staging)
    path = staging / "config.json"
    hf = json.loads(path.read_text())
    hf.pop("prunepath", None)
    if isinstance(hf.get("auto_map"), dict):
        hf["auto_map"] = {k: v for k, v in hf["auto_map"].items() if not str(v).startswith("prunepath_hf.")}
        if not hf["auto_map"]:
            hf.pop("auto_map")
    support = remote_code_support(model, cfg)
    if isinstance(support, tuple):
        auto, base = support
        hf.setdefault("auto_map", {})[auto] = "prunepath_hf.PrunePathModel"
        hf["prunepath"] = {"format_version": cfg.format_version, "num_experts": cfg.num_experts,
                           "neurons_per_expert": cfg.neurons_per_expert, "num_layers": cfg.num_layers,
                           "base_class": base, "routing": cfg.routing.to_dict()}
        (staging / REMOTE_CODE_NAME).write_text(_remote_code_source(base), encoding="utf-8")
    path.write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")


def _strip_hf_extras(config) -> None:
    """Drop the plain-transformers entries from a loaded config (a re-save writes them afresh)."""
    if getattr(config, "prunepath", None) is not None:
        try:
            delattr(config, "prunepath")
        except AttributeError:
            config.prunepath = None
    amap = getattr(config, "auto_map", None)
    if isinstance(amap, dict):
        kept = {k: v for k, v in amap.items() if not str(v).startswith("prunepath_hf.")}
        if kept != amap:
            if kept:
                config.auto_map = kept
            else:
                try:
                    delattr(config, "auto_map")
                except AttributeError:
                    config.auto_map = None


# ---- save / load ---------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def save(model: nn.Module, path: str | os.PathLike, tokenizer=None, *, extra: dict | None = None) -> Path:
    """Save a converted model to ``path`` (written to a temporary directory, swapped in when complete)."""
    from safetensors.torch import save_model


    cfg: PrunePathConfig | None = state_of(model).config
    if cfg is None:
        raise PrunePathError("only converted models can be saved with prunepath.save; call prunepath.moefy(model) "
                             "first (or use model.save_pretrained for a dense model)")
    final = Path(path).expanduser().resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not (final.is_dir() and (not any(final.iterdir()) or (final / CONFIG_NAME).exists())):
        raise PrunePathError(f"{final} exists and is not a PrunePath checkpoint; choose another output path "
                             "(PrunePath never overwrites other files)")
    _remove_stale_temporaries(final)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-{os.getpid()}-"))
    try:
        _write_hf_config(model, cfg, staging)
        save_model(model, str(staging / WEIGHTS_NAME), metadata={"format": "pt", "prunepath": "1"})
        tokenizer = tokenizer if tokenizer is not None else state_of(model).tokenizer
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        meta = cfg.to_dict()
        meta["model_class"] = type(model).__name__
        meta["source_display_name"] = state_of(model).display_name
        meta["prunepath_version"] = __version__
        meta["weights_sha256"] = _sha256(staging / WEIGHTS_NAME)
        if extra:
            meta["extra"] = extra
        # Last: the marker that makes the directory a checkpoint.
        (staging / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        atomic_replace_dir(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _written_by_prunepath(weights: Path) -> bool:
    """Whether a safetensors file carries prunepath.save's metadata (read from its header only)."""
    try:
        with open(weights, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= 100_000_000:
                return False
            header = json.loads(fh.read(n))
        return (header.get("__metadata__") or {}).get("prunepath") == "1"
    except (OSError, ValueError, AttributeError):
        return False


def read_config(path: str | os.PathLike) -> dict:
    """The raw ``prunepath_config.json`` of a checkpoint, with clear errors for anything else."""
    root = Path(path).expanduser()
    tmp = _TMP_NAME.match(root.name)
    if tmp and root.is_dir():
        target = root.parent / tmp.group("name")
        if tmp.group("kind").startswith("old-") and not (target / CONFIG_NAME).exists():
            raise PrunePathError(f"{root} is the previous checkpoint kept aside by an interrupted save; rename it "
                                 f"to {target} to use it")
        raise PrunePathError(f"{root} is a temporary directory left by an interrupted save, not a checkpoint; "
                             f"delete it (the checkpoint itself is {target})")
    if not root.exists():
        olds = sorted(p for p in root.parent.glob(f".{root.name}.old-*") if (p / CONFIG_NAME).exists()) \
            if root.parent.is_dir() else []
        if olds:
            raise PrunePathError(f"no checkpoint at {root}, but an interrupted save left the previous one at "
                                 f"{olds[-1]}; rename it to {root} to use it")
        raise PrunePathError(f"no such checkpoint directory: {root}")
    if not root.is_dir() or not (root / CONFIG_NAME).exists():
        if root.is_dir() and _written_by_prunepath(root / WEIGHTS_NAME):
            raise PrunePathError(f"{root} is an incomplete PrunePath checkpoint ({WEIGHTS_NAME} but no "
                                 f"{CONFIG_NAME}, which is written last): an interrupted save or copy; re-create "
                                 "it with prunepath.save or `prunepath convert`")
        raise PrunePathError(f"{root} is not a PrunePath checkpoint (no {CONFIG_NAME}); create one with "
                             "`prunepath convert --model NAME --out DIR` or prunepath.save(model, DIR)")
    try:
        meta = json.loads((root / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PrunePathError(f"{root / CONFIG_NAME} is corrupt ({exc}); re-create the checkpoint") from exc
    if not isinstance(meta, dict):
        raise PrunePathError(f"{root / CONFIG_NAME} is corrupt (not a JSON object); re-create the checkpoint")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        by = meta.get("prunepath_version") or "version"
        raise PrunePathError(f"{root} was saved by a newer prunepath {by} (checkpoint format {version}; this is "
                             f"prunepath {__version__}, which reads format {FORMAT_VERSION}); upgrade "
                             "prunepath to load it")
    return meta


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, device=None, *,
         verify: bool = True) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)`` from a PrunePath checkpoint directory; the tokenizer is None if not saved.
    ``verify`` checks model.safetensors against the SHA-256 recorded at save time (checkpoints that have one)."""
    import transformers
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoTokenizer

    root = Path(path).expanduser()
    meta = read_config(root)
    known = {f.name for f in fields(PrunePathConfig)}
    try:
        pcfg = PrunePathConfig.from_dict({k: v for k, v in meta.items() if k in known})
        model_cls = getattr(transformers, meta["model_class"])
        config = AutoConfig.from_pretrained(root)
    except (KeyError, TypeError, AttributeError, ValueError, OSError) as exc:
        raise PrunePathError(f"{root} has an unreadable PrunePath config ({exc}); re-create the checkpoint") from exc
    _strip_hf_extras(config)
    weights = root / WEIGHTS_NAME
    if not weights.exists():
        raise PrunePathError(f"{root} has no {WEIGHTS_NAME}: the checkpoint is incomplete; re-create it with "
                             "prunepath.save or `prunepath convert`")
    fix = "re-create the checkpoint (prunepath.save / `prunepath convert`) or restore it from a good copy"
    if verify and meta.get("weights_sha256") and _sha256(weights) != meta["weights_sha256"]:
        raise PrunePathError(f"{weights} is corrupt: its SHA-256 differs from the one recorded at save time "
                             f"(truncated, modified or damaged on disk); {fix}")
    model = model_cls._from_config(config, dtype=torch.float32)
    install_structure(model, pcfg)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise PrunePathError(f"{weights} is corrupt or does not match its config ({str(exc)[:200]}); "
                             f"{fix}") from exc
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
    state_of(model).tokenizer = tok
    state_of(model).display_name = meta.get("source_display_name")
    state_of(model).source = str(root)
    apply_attention_override(model)
    return model, tok
