"""Sparsity statistics of the last forward pass (PAPER.md §3.5), and every s_FFN count: PrunePath's inactive
experts, TEAL / CATS activation sparsity (:func:`activation_s_ffn`), the router's extra bytes
(:func:`router_byte_fraction`), and the meter that accumulates s_FFN over the tokens a metric scores
(:class:`ActiveMeter`, :func:`track_active`; evaluation and the studies use it)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from prunepath.models.adapters import ffn_byte_weights
from prunepath.routing.ffn import prunepath_modules
from prunepath.state import state_of


@dataclass
class SparsityStats:
    """s_ffn = 1 − mean over tokens and layers of |A| / E (the fraction of inactive experts)."""

    s_ffn: float
    mean_active: float  # experts per token per layer, averaged over layers
    num_experts: int
    tokens: int
    per_layer_active: list[float] = field(default_factory=list)
    per_layer_s_ffn: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(s_ffn=self.s_ffn, mean_active=self.mean_active, num_experts=self.num_experts,
                    tokens=self.tokens, per_layer_active=self.per_layer_active,
                    per_layer_s_ffn=self.per_layer_s_ffn)


def activation_s_ffn(s_in, s_mid, *, gated: bool, method: str = "teal"):
    """Fraction of the FFN's weight bytes a token does not read under activation sparsity (biases ignored).

    ``s_in``: fraction of the token's FFN input entries x_j zeroed (each skips one column of W_gate and of W_up,
    or of W₁); ``s_mid``: fraction of its intermediate entries h_i zeroed (each skips one row of W_downᵀ, and
    for CATS one row of W_up too). Works elementwise on floats or tensors.

    - TEAL, gated FFN (three equal matrices): (2·s_in + s_mid) / 3
    - CATS, gated FFN (the gate is always read): 2·s_mid / 3
    - TEAL, plain FFN (two equal matrices): (s_in + s_mid) / 2

    PrunePath's s_FFN (:func:`sparsity`) is the same quantity for expert sparsity: its experts are equal-size
    blocks of neurons, so the fraction of inactive experts is the fraction of FFN bytes not read.
    """
    if method == "cats":
        if not gated:
            raise ValueError("CATS needs a gated FFN")
        return s_mid * (2 / 3)
    if method != "teal":
        raise ValueError(f"unknown activation-sparsity method {method!r}")
    w_in, w_mid = ffn_byte_weights(gated)
    return w_in * s_in + w_mid * s_mid


def router_byte_fraction(model: nn.Module) -> float:
    """Router weights as a fraction of the FFN weights of a converted model (biases ignored): what PrunePath
    reads on top of its active experts, e.g. Linear(576, 48) against a gated 1536-wide FFN of 3·576·1536
    weights = 48 / (3·1536) ≈ 1.04 % for SmolLM2-135M at 32 neurons per expert. Same dtype, so bytes = counts."""
    mods = prunepath_modules(model)
    if not mods:
        raise ValueError("router_byte_fraction needs a converted model (prunepath.moefy first)")
    router = sum(p.numel() for m in mods for p in m.router.parameters() if p.dim() >= 2)
    ffn = sum(lin.weight.numel() for m in mods for lin in (m.gate_proj, m.up_proj, m.down_proj) if lin is not None)
    return router / ffn


def activation_modules(model: nn.Module) -> list[nn.Module]:
    """The TEAL / CATS wrappers of ``model`` (modules that record a per-token s_FFN in ``last_s_ffn``, i.e.
    :class:`prunepath.baselines.activation.ActivationSparseFFN`) in layer order; empty when none."""
    return sorted((m for m in model.modules() if hasattr(m, "last_s_ffn") and hasattr(m, "layer_index")),
                  key=lambda m: m.layer_index)


def _recorded(m: nn.Module, attr: str) -> torch.Tensor:
    """A module's record ``attr`` of the last forward."""
    v = getattr(m, attr)
    if v is None:
        raise RuntimeError("no forward pass recorded yet: run the model before asking for sparsity")
    return v


def _drop_padding(v: torch.Tensor, token_mask: torch.Tensor | None, keep_device: bool) -> torch.Tensor:
    """A per-token record as a 1-D float tensor of the kept tokens (boolean indexing: a host sync on a GPU)."""
    if token_mask is not None:
        v = v.reshape(token_mask.shape)[token_mask.to(torch.bool).to(v.device)]
    v = v.reshape(-1).float()
    return v if keep_device else v.cpu()


def _per_token(modules, attr: str, token_mask: torch.Tensor | None, keep_device: bool) -> list[torch.Tensor]:
    """Each module's per-token record ``attr`` from the last forward, padding dropped, as 1-D float tensors."""
    return [_drop_padding(_recorded(m, attr), token_mask, keep_device) for m in modules]


def activation_s_per_token(model: nn.Module, token_mask: torch.Tensor | None = None, *,
                           keep_device: bool = False) -> list[torch.Tensor]:
    """TEAL / CATS: per-(kept)-token s_FFN of the last forward, one 1-D float tensor per layer (moved to the CPU
    unless ``keep_device``)."""
    return _per_token(activation_modules(model), "last_s_ffn", token_mask, keep_device)


def active_counts(model: nn.Module, token_mask: torch.Tensor | None = None, *,
                  keep_device: bool = False) -> list[torch.Tensor]:
    """Active-expert count per (kept) token, one 1-D tensor per layer, from the last forward (moved to the CPU
    unless ``keep_device``)."""
    return _per_token(prunepath_modules(model), "last_active", token_mask, keep_device)


def inner_s_per_token(model: nn.Module, token_mask: torch.Tensor | None = None, *,
                      keep_device: bool = False) -> list[torch.Tensor] | None:
    """With in-expert thresholds on (``RoutingConfig.inner``, or training with ``inner_sparsity_max``): per-(kept)
    token fraction of FFN weight bytes not read, one 1-D tensor per layer; None when they were off."""
    mods = prunepath_modules(model)
    if not mods or any(m.last_inner_kept is None for m in mods):
        return None
    return [_drop_padding(_inner_bytes_not_read(m), token_mask, keep_device) for m in mods]


def _inner_bytes_not_read(m: nn.Module) -> torch.Tensor:
    """Per token (all tokens, leading shape kept), the FFN's fraction of weight bytes not read, from the
    (kept input share, kept down share) pair it recorded."""
    kept = m.last_inner_kept.float()
    return activation_s_ffn(1.0 - kept[..., 0], 1.0 - kept[..., 1], gated=m.gated)


def s_ffn_tensor(model: nn.Module, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``sparsity(model, token_mask).s_ffn`` as a 0-d tensor on the model's device: no host read, for hot loops
    (masked means, not boolean indexing, which waits for the GPU to learn the output size)."""
    mods = prunepath_modules(model)
    if not mods:
        raise RuntimeError("no forward pass recorded yet: run the model before asking for sparsity")
    if all(m.last_inner_kept is not None for m in mods):
        per_layer = [_inner_bytes_not_read(m) for m in mods]
    else:
        e = state_of(model).config.num_experts
        per_layer = [1.0 - _recorded(m, "last_active").float() / e for m in mods]
    if token_mask is None:
        return torch.stack([s.mean() for s in per_layer]).mean()
    w = token_mask.to(per_layer[0].device, torch.float32).reshape(per_layer[0].shape)
    return torch.stack([(s * w).sum() for s in per_layer]).mean() / w.sum()


def sparsity(model: nn.Module, token_mask: torch.Tensor | None = None) -> SparsityStats:
    """Statistics of the last forward; ``token_mask`` (e.g. an attention mask) drops padding tokens.

    A dense, unconverted model reports s_ffn = 0, or with TEAL / CATS applied its measured activation s_FFN
    (``num_experts`` 0, no active counts).
    """
    cfg = state_of(model).config
    if cfg is None and state_of(model).activation is not None:
        per_tok = activation_s_per_token(model, token_mask)
        per_layer_s = [float(s.mean()) if s.numel() else float("nan") for s in per_tok]
        return SparsityStats(s_ffn=sum(per_layer_s) / len(per_layer_s) if per_layer_s else 0.0, mean_active=0.0,
                             num_experts=0, tokens=int(per_tok[0].numel()) if per_tok else 0,
                             per_layer_s_ffn=per_layer_s)
    if cfg is None:
        return SparsityStats(0.0, 0.0, 0, 0)
    counts = active_counts(model, token_mask)
    e = cfg.num_experts
    per_layer = [float(c.mean()) if c.numel() else float("nan") for c in counts]
    mean_active = sum(per_layer) / len(per_layer)
    inner = inner_s_per_token(model, token_mask)
    per_layer_s = ([float(s.mean()) for s in inner] if inner is not None else [1.0 - a / e for a in per_layer])
    return SparsityStats(
        s_ffn=sum(per_layer_s) / len(per_layer_s), mean_active=mean_active, num_experts=e,
        tokens=int(counts[0].numel()) if counts else 0, per_layer_active=per_layer,
        per_layer_s_ffn=per_layer_s,
    )


class ActiveMeter:
    """Accumulates per-layer active-expert counts over many forwards (mean and histogram per layer).

    ``update(model, mask)`` reads the counts of the last forward for the tokens where ``mask`` is True; a dense
    (unconverted) model is accepted and reports s_ffn = 0, or with TEAL / CATS applied the mean over tokens and
    layers of the measured fraction of FFN weight bytes not read (:func:`activation_s_ffn`).
    """

    def __init__(self, model: nn.Module) -> None:
        cfg = state_of(model).config
        self.converted = cfg is not None
        self.num_experts = cfg.num_experts if cfg is not None else 0
        # Wanda (static unstructured pruning) reports its weight sparsity as s_FFN, as the paper does.
        self.static_sparsity = state_of(model).static_sparsity
        # TEAL / CATS on a dense model: per-token s_FFN recorded by each wrapped FFN.
        self.activation = not self.converted and state_of(model).activation is not None
        self.sums: list[float] | None = None
        self.hist: list[torch.Tensor] | None = None
        self.inner_sums: list[float] | None = None  # in-expert thresholds: bytes not read, summed per layer
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
        inner = inner_s_per_token(model, token_mask, keep_device=True)
        if inner is not None:
            sums = torch.stack([s.double().sum() for s in inner]).cpu().tolist()
            self.inner_sums = sums if self.inner_sums is None else [a + b for a, b in zip(self.inner_sums, sums)]
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
        out = {"s_ffn": 1.0 - mean_active / e, "mean_active": mean_active, "num_experts": e,
               "per_layer_active": per_layer, "per_layer_s_ffn": [1.0 - a / e for a in per_layer],
               "active_hist": [h.tolist() for h in self.hist], "stat_tokens": self.tokens}
        if self.inner_sums is not None:  # bytes, not experts: in-expert thresholds skip parts of active experts
            per_layer_s = [s / self.tokens for s in self.inner_sums]
            out.update(s_ffn=sum(per_layer_s) / len(per_layer_s), per_layer_s_ffn=per_layer_s,
                       s_ffn_kind="experts + in-expert activations (FFN weight bytes not read)",
                       s_experts=1.0 - mean_active / e)
        return out


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
