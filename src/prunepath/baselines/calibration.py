"""Calibration text for the baselines: token batches, cached FFN inputs and per-expert statistics.

Every baseline that looks at activations (MoEfication / D2DMoE router fitting, Wanda, static expert pruning)
goes through these helpers, so they all see the same tokens in the same order.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from prunepath.errors import PrunePathError
from prunepath.evaluation.common import shared_data_dir


# The shared data folder: ``$PRUNEPATH_DATA`` or ``<repo>/../shared/data`` (one definition, in evaluation).
data_root = shared_data_dir


def default_calibration_texts(max_docs: int | None = None) -> list[str]:
    """Alpaca-sample instructions + XSum-sample documents (never WikiText, which is the evaluation text)."""
    root = data_root()
    texts: list[str] = []
    alpaca = root / "alpaca-sample" / "alpaca_data_1k.json"
    xsum = root / "xsum-sample" / "xsum_sample.jsonl"
    if not alpaca.exists() and not xsum.exists():
        raise PrunePathError(f"no calibration text found under {root}; set PRUNEPATH_DATA to the shared data folder "
                             "or pass your own texts")
    if xsum.exists():
        for line in xsum.read_text().splitlines():
            if line.strip():
                texts.append(json.loads(line)["document"])
    if alpaca.exists():
        for ex in json.loads(alpaca.read_text()):
            texts.append("\n".join(s for s in (ex.get("instruction"), ex.get("input"), ex.get("output")) if s))
    return texts[:max_docs] if max_docs else texts


def token_batches(tokenizer, texts: Sequence[str], *, seq_len: int = 256, max_tokens: int = 16384,
                  batch_size: int = 4) -> list[torch.Tensor]:
    """Concatenate ``texts`` (EOS between documents) and cut them into ``[batch, seq_len]`` id tensors holding at
    most ``max_tokens`` tokens in all."""
    if not texts:
        raise PrunePathError("no calibration texts given; pass a non-empty list of strings")
    if seq_len < 2 or max_tokens < seq_len:
        raise PrunePathError(f"need seq_len >= 2 and max_tokens >= seq_len (got {seq_len}, {max_tokens})")
    sep = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"] + sep)
        if len(ids) >= max_tokens:
            break
    n = min(len(ids), max_tokens) // seq_len
    if n == 0:
        raise PrunePathError(f"calibration texts give only {len(ids)} tokens, fewer than seq_len={seq_len}; "
                             "pass more text or a smaller seq_len")
    rows = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return list(rows.split(batch_size))


@contextmanager
def dense_routing(model: nn.Module) -> Iterator[None]:
    """Run a converted model exactly dense (every expert, unit gates); a dense model is left alone."""
    if getattr(model, "prunepath_config", None) is None:
        yield
        return
    from prunepath.routing.control import routing

    with routing(model, method="prunepath", rule="all", gates=False):
        yield


def run_batches(model: nn.Module, batches: Sequence[torch.Tensor], *, desc: str = "calibration",
                progress: bool = True) -> None:
    """Forward every batch (no grad, dense routing) so that hooks can record what they need."""
    device = next(model.parameters()).device
    with torch.no_grad(), dense_routing(model):
        for b in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
            model(input_ids=b.to(device))


def collect_ffn_inputs(model: nn.Module, batches: Sequence[torch.Tensor], *, progress: bool = True,
                       dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Each PrunePath FFN's input x over all calibration tokens: one ``[tokens, hidden]`` CPU tensor per layer."""
    from prunepath.conversion.moefy import prunepath_modules

    mods = prunepath_modules(model)
    if not mods:
        raise PrunePathError("collect_ffn_inputs needs a converted model (prunepath.moefy first)")
    from prunepath.training.calibration import collect_ffn_inputs as collect_masked_inputs

    # One hook-based collector for the whole project; the baselines run it with every expert active.
    with dense_routing(model):
        xs = collect_masked_inputs(model, mods, ({"input_ids": b} for b in batches), progress)
    return [x.to(dtype) for x in xs]


def expert_mass(ffn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Activation mass of each expert [..., E]: Σ over its neurons of |act(gate)·up| (gated) or of the positive
    part of act(x W₁ + b₁) (plain FFNs), as MoEfication's routing targets."""
    h = ffn.intermediate(x).float()
    h = h.abs() if ffn.gated else h.clamp(min=0)
    return h.view(*h.shape[:-1], ffn.num_experts, ffn.neurons_per_expert).sum(-1)


def expert_output_norms(ffn: nn.Module, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """‖FFN_e(x)‖₂ of every expert's contribution to the output (down-projection bias excluded) [tokens, E]."""
    return ffn.expert_output_norms(x, chunk)
