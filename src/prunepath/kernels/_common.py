"""Shared helpers: is Triton usable here, and in which mode."""

from __future__ import annotations

import os

import torch

from prunepath.errors import PrunePathError


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def check_kernel_device(t: torch.Tensor) -> None:
    """Raise a PrunePathError naming the fix when a Triton kernel cannot run on ``t``'s device."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - triton is a test dependency
        raise PrunePathError("the decode kernels need Triton: pip install 'prunepath[kernels]' "
                             "(or use --kernels torch)") from exc
    if t.device.type == "cuda" or interpreting():
        return
    raise PrunePathError(
        "the Triton decode kernels need a CUDA GPU: use --device cuda, or set TRITON_INTERPRET=1 to run them "
        "(slowly) on the CPU, or use --kernels torch")


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few programs exercise the persistent loops


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


class DeviceBudget:
    """τ and k held in device tensors (``tau_tensor``, ``k_tensor``): :meth:`set_tau` rewrites them in place, so a
    captured CUDA graph sees the new values at its next replay. The one ``set_tau`` of the kernels (the router,
    the dense-equivalent FFN and the per-layer :class:`~prunepath.kernels.ffn.SparseFFN` share it)."""

    tau_tensor: "torch.Tensor"
    k_tensor: "torch.Tensor"

    def set_tau(self, tau: float | None = None, k: int | None = None) -> None:
        """Change τ (and k) in place: a captured graph sees the new value at its next replay."""
        if tau is not None:
            self.tau_tensor.fill_(float(tau))
        if k is not None:
            self.k_tensor.fill_(int(k))
