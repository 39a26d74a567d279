"""Helpers shared by the evaluation tasks: model naming, BOS policy, tokenizer checks, data paths, machine info,
and the active-expert meter that measures s_FFN on exactly the tokens a metric scores."""

from __future__ import annotations

import os
import platform
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from prunepath.errors import PrunePathError
from prunepath.io import (  # noqa: F401  (re-exported: data paths live in io)
    shared_data_dir, repo_shared_data_dir, builtin_data_dir, data_search_paths, resolve_data_path, check_text_file)
from prunepath.stats import activation_s_per_token
from prunepath.stats import active_counts


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
    base = getattr(model, "prunepath_display_name", None)
    if not base:
        base = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    cfg = getattr(model, "prunepath_config", None)
    if cfg is not None:
        router = "" if cfg.router == "linear" else f", router {cfg.router}"
        base = f"{base} + PrunePath {cfg.num_experts}x{cfg.neurons_per_expert} ({cfg.clustering}{router})"
    act = getattr(model, "prunepath_activation", None)
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
    cfg = getattr(model, "prunepath_config", None)
    meta = {"model": model_name(model), "converted": cfg is not None,
            "source": getattr(model, "prunepath_source", None), "dtype": model_dtype(model)}
    if cfg is not None:
        meta["num_experts"] = cfg.num_experts
        meta["neurons_per_expert"] = cfg.neurons_per_expert
        meta["routing"] = cfg.routing.to_dict()
    act = getattr(model, "prunepath_activation", None)
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


class ActiveMeter:
    """Accumulates per-layer active-expert counts over many forwards (mean and histogram per layer).

    ``update(model, mask)`` reads the counts of the last forward for the tokens where ``mask`` is True; a dense
    (unconverted) model is accepted and reports s_ffn = 0, or with TEAL / CATS applied the mean over tokens and
    layers of the measured fraction of FFN weight bytes not read (:func:`prunepath.stats.activation_s_ffn`).
    """

    def __init__(self, model: nn.Module) -> None:
        cfg = getattr(model, "prunepath_config", None)
        self.converted = cfg is not None
        self.num_experts = cfg.num_experts if cfg is not None else 0
        # Wanda (static unstructured pruning) reports its weight sparsity as s_FFN, as the paper does.
        self.static_sparsity = getattr(model, "prunepath_static_sparsity", None)
        # TEAL / CATS on a dense model: per-token s_FFN recorded by each wrapped FFN.
        self.activation = not self.converted and getattr(model, "prunepath_activation", None) is not None
        self.sums: list[float] | None = None
        self.hist: list[torch.Tensor] | None = None
        self.tokens = 0

    def update(self, model: nn.Module, token_mask: torch.Tensor | None = None) -> None:
        if self.activation:
            per_layer = activation_s_per_token(model, token_mask, keep_device=True)
            sums = torch.stack([s.double().sum() for s in per_layer]).cpu().tolist()  # one host read per forward
            self.sums = sums if self.sums is None else [a + b for a, b in zip(self.sums, sums)]
            self.tokens += int(per_layer[0].numel()) if per_layer else 0
            return
        if not self.converted:
            self.tokens += int(token_mask.sum()) if token_mask is not None else 0
            return

        counts = active_counts(model, token_mask)
        if self.sums is None:
            self.sums = [0.0] * len(counts)
            self.hist = [torch.zeros(self.num_experts + 1, dtype=torch.long) for _ in counts]
        for i, c in enumerate(counts):
            self.sums[i] += float(c.double().sum())
            self.hist[i] += torch.bincount(c.long(), minlength=self.num_experts + 1)[: self.num_experts + 1]
        self.tokens += int(counts[0].numel()) if counts else 0

    def result(self) -> dict:
        """s_ffn, mean_active (experts per token per layer), per-layer means / s_FFN, and per-layer histograms
        (``active_hist[layer][k]`` = tokens with k active experts)."""
        if self.activation:
            per_layer = [s / self.tokens for s in self.sums] if self.sums and self.tokens else []
            return {"s_ffn": sum(per_layer) / len(per_layer) if per_layer else 0.0,
                    "s_ffn_kind": "activation (FFN weight bytes not read)", "mean_active": None, "num_experts": 0,
                    "per_layer_active": [], "per_layer_s_ffn": per_layer, "active_hist": [],
                    "stat_tokens": self.tokens}
        if not self.converted and self.static_sparsity is not None:
            return {"s_ffn": float(self.static_sparsity), "s_ffn_kind": "weights (unstructured)",
                    "mean_active": None, "num_experts": 0, "per_layer_active": [], "per_layer_s_ffn": [],
                    "active_hist": [], "stat_tokens": self.tokens}
        if not self.converted or not self.sums or self.tokens == 0:
            return {"s_ffn": 0.0, "mean_active": None, "num_experts": self.num_experts, "per_layer_active": [],
                    "per_layer_s_ffn": [], "active_hist": [], "stat_tokens": self.tokens}
        e = self.num_experts
        per_layer = [s / self.tokens for s in self.sums]
        mean_active = sum(per_layer) / len(per_layer)
        return {"s_ffn": 1.0 - mean_active / e, "mean_active": mean_active, "num_experts": e,
                "per_layer_active": per_layer, "per_layer_s_ffn": [1.0 - a / e for a in per_layer],
                "active_hist": [h.tolist() for h in self.hist], "stat_tokens": self.tokens}


@contextmanager
def track_active(model: nn.Module, meter: ActiveMeter, skip_first: bool = False) -> Iterator[ActiveMeter]:
    """Update ``meter`` after every forward of ``model`` (e.g. inside ``generate``), all positions counted.
    ``skip_first`` leaves out the first forward (the prompt's prefill), i.e. counts only decode steps."""
    if not meter.converted and not meter.activation:
        yield meter
        return
    calls = [0]

    def hook(module, args, output):
        calls[0] += 1
        if skip_first and calls[0] == 1:
            return
        meter.update(model)

    handle = model.register_forward_hook(hook)
    try:
        yield meter
    finally:
        handle.remove()
