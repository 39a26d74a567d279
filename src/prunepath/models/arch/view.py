"""The decode weight view: what the decode engine reads from a model, architecture-independent."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerView:
    """One transformer block: fused QKV ([3·heads·head_dim or GQA, hidden]) and output projection weights in
    ``Linear`` layout ([out, in]), and the two norms (bias None for RMSNorm)."""

    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor | None
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor | None


@dataclass
class DecodeView:
    """The whole model for decoding: norm kind and epsilon, attention shape, embeddings (``wpe`` for learned
    positions, ``cos`` / ``sin`` [max_len, head_dim] for RoPE), the final norm, the LM head and the blocks."""

    rms: bool
    eps: float
    heads: int
    kv_heads: int
    head_dim: int
    embed: torch.Tensor
    wpe: torch.Tensor | None
    final_w: torch.Tensor
    final_b: torch.Tensor | None
    lm_head: torch.Tensor
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    layers: list[LayerView]
