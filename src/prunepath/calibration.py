"""Calibration, in one module: calibration text (the shared samples or a corpus mix), token batches, dense
routing for calibration passes, the one hook-based collector of FFN inputs, and per-expert statistics.

Every baseline that looks at activations (MoEfication / D2DMoE router fitting, Wanda, static expert pruning),
the trainer's calibration options (router warm start, always-on experts, layer sensitivity) and TEAL / CATS go
through these helpers, so they all see the same tokens in the same order. Method-specific calibration stays
with its method (``training/calibration.py``: warm start, always-on, sensitivity; ``evaluation/calibration.py``:
τ for a target s_FFN).
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from prunepath.data.corpora import corpus_names, load_corpus, split_documents
from prunepath.errors import PrunePathError
from prunepath.io import shared_data_dir
from prunepath.routing.control import routing
from prunepath.routing.ffn import prunepath_modules
from prunepath.state import state_of


# The shared data folder: ``$PRUNEPATH_DATA`` or ``<repo>/../shared/data`` (one definition, in prunepath.io).
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


def calibration_texts(source: str, chars_per_doc: int = 3000) -> tuple[list[str], str]:
    """Training-split documents of a registry corpus mix, round-robin across corpora (first ``chars_per_doc``
    characters of each document, so no single corpus dominates); falls back to the Alpaca/XSum samples."""
    try:
        per = [split_documents(load_corpus(n), "train") for n in corpus_names(source)]
        texts = []
        for i in range(max(len(p) for p in per)):
            texts.extend(p[i]["text"][:chars_per_doc] for p in per if i < len(p))
        return texts, f"{source} (train split, first {chars_per_doc} chars per document, round-robin)"
    except Exception as exc:  # noqa: BLE001 - any fetch problem: use the shared samples instead
        print(f"corpus {source} unavailable ({exc}); using alpaca/xsum samples", file=sys.stderr)
        return default_calibration_texts(), "alpaca-sample + xsum-sample"


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
    if state_of(model).config is None:
        yield
        return
    with routing(model, method="prunepath", rule="all", gates=False):
        yield


def run_batches(model: nn.Module, batches: Sequence[torch.Tensor], *, desc: str = "calibration",
                progress: bool = True) -> None:
    """Forward every batch (no grad, dense routing) so that hooks can record what they need."""
    device = next(model.parameters()).device
    with torch.no_grad(), dense_routing(model):
        for b in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
            model(input_ids=b.to(device))


def calibration_batches(dataset, num_tokens: int, batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
    """The first rows of ``dataset`` holding about ``num_tokens`` non-pad tokens, as batches."""
    rows, seen = [], 0
    for i in range(len(dataset)):
        item = dataset[i]
        rows.append(item)
        seen += int(item["attention_mask"].sum()) if "attention_mask" in item else int(item["input_ids"].numel())
        if seen >= num_tokens:
            break
    return [{k: torch.stack([r[k] for r in rows[j:j + batch_size]]) for k in rows[0]}
            for j in range(0, len(rows), batch_size)]


def _model_inputs(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


@contextmanager
def _capture_inputs(modules: list[nn.Module], store: list[list[torch.Tensor]],
                    masks: list[torch.Tensor]) -> Iterator[None]:
    """Record each module's input (kept tokens only, float32, CPU)."""
    def hook_for(i):
        def hook(_mod, args):
            x = args[0].detach()
            m = masks[-1].to(x.device).reshape(-1) if masks else None
            x = x.reshape(-1, x.shape[-1])
            store[i].append((x[m] if m is not None else x).float().cpu())
        return hook
    handles = [m.register_forward_pre_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def capture_ffn_inputs(model: nn.Module, modules: list[nn.Module], batches: Iterable[dict],
                       progress: bool = False) -> list[torch.Tensor]:
    """Per-layer [tokens, hidden] inputs of ``modules`` (FFN inputs) over the non-pad calibration tokens."""
    device = next(model.parameters()).device
    store: list[list[torch.Tensor]] = [[] for _ in modules]
    masks: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    with _capture_inputs(modules, store, masks):
        for batch in tqdm(list(batches), desc="calibration", disable=not progress, leave=False):
            masks.append(batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool())
            model(**_model_inputs(batch, device))
    model.train(was_training)
    return [torch.cat(s) for s in store]


def collect_ffn_inputs(model: nn.Module, batches: Sequence[torch.Tensor], *, progress: bool = True,
                       dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Each PrunePath FFN's input x over all calibration tokens: one ``[tokens, hidden]`` CPU tensor per layer."""
    mods = prunepath_modules(model)
    if not mods:
        raise PrunePathError("collect_ffn_inputs needs a converted model (prunepath.moefy first)")
    # One hook-based collector for the whole project; the baselines run it with every expert active.
    with dense_routing(model):
        xs = capture_ffn_inputs(model, mods, ({"input_ids": b} for b in batches), progress)
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
