"""Helpers shared by the evaluation tasks: model naming, BOS policy, tokenizer checks, data paths, machine info.
The active-expert meter that measures s_FFN on exactly the tokens a metric scores (``ActiveMeter``,
``track_active``) lives in :mod:`prunepath.stats`, with every other s_FFN count, and is re-exported here."""

from __future__ import annotations

import os
import platform

import torch
from torch import nn

from prunepath.errors import PrunePathError
from prunepath.state import state_of
from prunepath.stats import ActiveMeter, track_active  # noqa: F401  (re-exported: s_FFN counts live in stats)
from prunepath.io import (  # noqa: F401  (re-exported: data paths live in io)
    shared_data_dir, repo_shared_data_dir, builtin_data_dir, data_search_paths, resolve_data_path, check_text_file)


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def prepare_model(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """Move ``model`` to ``device`` (if given), put it in eval mode, return its device."""
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise PrunePathError(f"device {device} asked for a GPU but none is available here; use device='cpu'")
        model.to(dev)
    model.eval()
    return model_device(model)


def model_name(model: nn.Module) -> str:
    """Exact display name for results: the source model (with quantisation), plus the expert layout when
    converted, e.g. ``SmolLM2-135M-Instruct (Q4_1, dequantised) + PrunePath 48x32``."""
    base = state_of(model).display_name
    if not base:
        base = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    cfg = state_of(model).config
    if cfg is not None:
        router = "" if cfg.router == "linear" else f", router {cfg.router}"
        base = f"{base} + PrunePath {cfg.num_experts}x{cfg.neurons_per_expert} ({cfg.clustering}{router})"
    act = state_of(model).activation
    if cfg is None and act is not None:  # TEAL / CATS: the method names the curve; the target is in model_meta
        base = f"{base} + {act.method.upper()}" + (f" ({act.allocation})" if act.method == "teal" else "")
    return str(base)


def model_dtype(model: nn.Module) -> str | None:
    """The dtype of the model's floating-point weights, e.g. ``float32`` / ``bfloat16`` (None if it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).replace("torch.", "")
    return None


def model_meta(model: nn.Module) -> dict:
    """Fields every result carries about the model and its routing."""
    cfg = state_of(model).config
    meta = {"model": model_name(model), "converted": cfg is not None,
            "source": state_of(model).source, "dtype": model_dtype(model)}
    if cfg is not None:
        meta["num_experts"] = cfg.num_experts
        meta["neurons_per_expert"] = cfg.neurons_per_expert
        meta["routing"] = cfg.routing.to_dict()
    act = state_of(model).activation
    if cfg is None and act is not None:
        meta["activation_sparsity"] = {"method": act.method, "target": act.target, "allocation": act.allocation}
    return meta


def machine_info() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def embedding_rows(model: nn.Module) -> int | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(emb.num_embeddings) if emb is not None else None


def check_tokenizer(model: nn.Module, tokenizer) -> None:
    """Clear errors for a missing or mismatched tokenizer (token ids beyond the model's embedding table)."""
    if tokenizer is None:
        raise PrunePathError("no tokenizer: this checkpoint was saved without one; pass --tokenizer NAME|DIR "
                             "(the tokenizer of the model it was converted from)")
    rows = embedding_rows(model)
    n = len(tokenizer)
    if rows is not None and n > rows:
        raise PrunePathError(f"tokenizer/model mismatch: the tokenizer has {n} tokens but the model embeds only "
                             f"{rows}; pass the tokenizer of this model (--tokenizer)")


def check_token_ids(model: nn.Module, ids: torch.Tensor) -> None:
    rows = embedding_rows(model)
    if rows is not None and ids.numel() and int(ids.max()) >= rows:
        raise PrunePathError(f"token id {int(ids.max())} is outside the model's vocabulary ({rows} rows): the data "
                             "was tokenized with another tokenizer; re-tokenize with this model's tokenizer")


def pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def require_causal_lm(model: nn.Module, task: str) -> None:
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise PrunePathError(f"task {task!r} needs a causal language model (with an LM head); "
                             f"{type(model).__name__} has none")
