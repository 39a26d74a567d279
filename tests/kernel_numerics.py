"""Comparison helpers shared by the kernel tests."""

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (0-safe)."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def gap_threshold(v: torch.Tensor, q: float) -> float:
    """A threshold near the q-quantile of |v| in the widest gap between neighbouring values there, so fp32
    rounding in a kernel cannot move an entry across it."""
    a = v.detach().abs().double().flatten().sort().values
    i = int(q * (a.numel() - 1))
    lo, hi = max(0, i - 3), min(a.numel() - 1, i + 3)
    j = lo + int((a[lo + 1:hi + 1] - a[lo:hi]).argmax())
    return float((a[j] + a[j + 1]) / 2)
