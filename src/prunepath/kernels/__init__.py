"""Decode kernels (Triton) for PrunePath FFNs, their PyTorch references and the expert-contiguous layout.

* :func:`pack_ffn` — converted FFN → :class:`PackedFFN` (expert-contiguous bf16 blocks).
* :class:`SparseFFN` — routing kernel + fused expert kernels for one layer (graph-safe, τ changeable).
* :mod:`prunepath.kernels.reference` — PyTorch references for every kernel.

Triton is imported lazily: importing this package does not need it.
"""

from __future__ import annotations

from prunepath.kernels._common import check_kernel_device, interpreting
from prunepath.kernels.layout import ACTIVATIONS, PackedFFN, detect_activation, pack_ffn, random_packed_ffn

__all__ = ["ACTIVATIONS", "PackedFFN", "SparseFFN", "check_kernel_device", "detect_activation", "interpreting",
           "pack_ffn", "random_packed_ffn"]


def __getattr__(name: str):
    if name == "SparseFFN":
        from prunepath.kernels.ffn import SparseFFN
        return SparseFFN
    raise AttributeError(name)
