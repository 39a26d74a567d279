"""Shared helpers: is Triton usable here, and in which mode."""

from __future__ import annotations

import os

import torch

from prunepath.errors import PrunePathError


THRESHOLD_OFF = -1.0  # an activation threshold that keeps every entry (|v| > -1 always): "no masking" on the device


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
    """τ and k held in device tensors (``tau``: float32 [1], ``k``: int32 [1]): :meth:`set_tau` rewrites them in
    place, so a captured CUDA graph sees the new values at its next replay. The one ``set_tau`` of the kernels
    (the router, the dense-equivalent FFN and the per-layer :class:`~prunepath.kernels.ffn.SparseFFN` share it).
    The tensors may be views of the decode engine's one per-model tensor (one entry per layer, see
    :func:`budget_tensors`); ``tau_tensor`` / ``k_tensor`` are their public names (benchmarks point ``k_tensor``
    at a shared tensor to drive per-token counts)."""

    tau: "torch.Tensor"
    k: "torch.Tensor"

    @property
    def tau_tensor(self) -> torch.Tensor:
        return self.tau

    @property
    def k_tensor(self) -> torch.Tensor:
        return self.k

    @k_tensor.setter
    def k_tensor(self, t: torch.Tensor) -> None:
        self.k = t

    def set_tau(self, tau: float | None = None, k: int | None = None) -> None:
        """Change τ (and k) in place: a captured graph sees the new value at its next replay."""
        if tau is not None:
            self.tau_tensor.fill_(float(tau))
        if k is not None:
            self.k_tensor.fill_(int(k))


def budget_tensors(tau: "float | torch.Tensor", k: "int | torch.Tensor | None", num_experts: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ, k) as device tensors of one element: a tensor passed in is used as it is (a view of a per-model
    tensor, shared with whoever rewrites it); a number gets a tensor of its own (k None: every expert)."""
    if not isinstance(tau, torch.Tensor):
        tau = torch.tensor([float(tau)], dtype=torch.float32, device=device)
    if not isinstance(k, torch.Tensor):
        k = torch.tensor([int(k) if k is not None else num_experts], dtype=torch.int32, device=device)
    return tau, k
