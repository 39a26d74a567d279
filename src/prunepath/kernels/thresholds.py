"""Activation-threshold FFN kernels (decode): TEAL-style skipping of weight rows inside the FFN.

An FFN whose every expert runs unscaled (a dense model, or an ungated PrunePath checkpoint at τ > 1) can still
skip bytes inside the FFN: input entries with |x_i| ≤ t_in need not read their column of W_gate / W_up, and
intermediate entries with |h_j| ≤ t_mid need not read their row of W_down. This is the rule of
:meth:`prunepath.routing.ffn.PrunePathFFN.thresholded_forward` (in-expert thresholds) and of TEAL
(:func:`prunepath.baselines.activation.masked_ffn`), so one kernel pair decodes both.

* ``_in_kernel``: gate|up are stored transposed (``w_in_t`` [d, E·R], one contiguous row per input entry), so a
  dropped input entry is a whole row that is never loaded. Programs (column block, row block, token) add their
  partial pre-activations into an fp32 accumulator (split-K).
* ``_out_kernel``: programs (output block, neuron block, token) finish h = act(gate)·up (or act(W_1 x + b)) for
  their neurons, drop |h| ≤ t_mid, and read only the kept rows of W_down (``PackedFFN.w_out``, already one
  contiguous row per neuron); one atomic add per output element into the fp32 residual.

Masked-off rows issue no loads, so the bytes read fall with the fraction dropped. Each token of a batch reads
its own kept rows: this is a batch-1 path (batch B reads up to B times the bytes; use the masked dense path
there). The thresholds live in a device tensor, so a captured CUDA graph follows :meth:`ThresholdFFN.set`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prunepath.errors import PrunePathError
from prunepath.kernels._common import THRESHOLD_OFF as OFF
from prunepath.kernels._common import check_kernel_device, next_pow2
from prunepath.kernels.experts import ACT_IDS, _act
from prunepath.kernels.layout import PackedFFN


@triton.jit
def _in_kernel(x_ptr, wt_ptr, t_ptr, acc_ptr, D, M,
               BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """acc[b, m] += Σ_{k in block, |x_bk| > t_in} x_bk · w_in_t[k, m]."""
    mb = tl.program_id(0)
    kb = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    mk = offs_k < D
    mm = offs_m < M
    t = tl.load(t_ptr)
    x = tl.load(x_ptr + b * D + offs_k, mask=mk, other=0.0).to(tl.float32)
    keep = mk & (tl.abs(x) > t)
    w = tl.load(wt_ptr + offs_k.to(tl.int64)[:, None] * M + offs_m[None, :], mask=keep[:, None] & mm[None, :],
                other=0.0)
    part = tl.sum(w.to(tl.float32) * x[:, None], axis=0)
    tl.atomic_add(acc_ptr + b * M + offs_m, part, mask=mm, sem="relaxed")


@triton.jit
def _out_kernel(acc_ptr, bin_ptr, w_ptr, bias_ptr, t_ptr, y_ptr, D, I, N, R,
                BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, GATED: tl.constexpr, HAS_BIN: tl.constexpr,
                ACT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """y[b, d] += Σ_{j in block, |h_bj| > t_mid} h_bj · w_out[j, d] (+ b_out once, from neuron block 0)."""
    db = tl.program_id(0)
    jb = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_j = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    mj = offs_j < I
    md = offs_d < D
    e = offs_j // N
    col = e * R + (offs_j - e * N)  # the neuron's gate (or W_1) column in the expert-packed pre-activations
    M = (I // N) * R
    if GATED:
        g = tl.load(acc_ptr + b * M + col, mask=mj, other=0.0)
        u = tl.load(acc_ptr + b * M + col + N, mask=mj, other=0.0)
        if HAS_BIN:
            g += tl.load(bin_ptr + col, mask=mj, other=0.0)
            u += tl.load(bin_ptr + col + N, mask=mj, other=0.0)
        h = _act(g, ACT) * u
    else:
        u = tl.load(acc_ptr + b * M + col, mask=mj, other=0.0)
        if HAS_BIN:
            u += tl.load(bin_ptr + col, mask=mj, other=0.0)
        h = _act(u, ACT)
    t = tl.load(t_ptr)
    keep = mj & (tl.abs(h) > t)
    h = tl.where(keep, h, 0.0)
    w = tl.load(w_ptr + offs_j.to(tl.int64)[:, None] * D + offs_d[None, :], mask=keep[:, None] & md[None, :],
                other=0.0)
    part = tl.sum(h[:, None] * w.to(tl.float32), axis=0)
    if HAS_BIAS:
        part += tl.load(bias_ptr + offs_d, mask=md, other=0.0) * (jb == 0).to(tl.float32)
    tl.atomic_add(y_ptr + b * D + offs_d, part, mask=md, sem="relaxed")


def thresholds_tensor(t_in: float | None, t_mid: float | None, device: torch.device | str) -> torch.Tensor:
    """float32 [2] device tensor (t_in, t_mid); None becomes :data:`OFF` (keep every entry)."""
    return torch.tensor([OFF if t_in is None else float(t_in), OFF if t_mid is None else float(t_mid)],
                        dtype=torch.float32, device=device)


class ThresholdFFN:
    """Decode-time FFN of one layer with activation thresholds: ``ffn(x, out)`` adds FFN(x) into ``out``
    (fp32 [B, d]), reading only the gate|up rows of kept input entries and the W_down rows of kept neurons.

    ``thresholds``: float32 [2] device tensor (t_in, t_mid), e.g. a view of the engine's per-model tensor
    (:func:`thresholds_tensor`; :data:`OFF` = no masking). Graph-safe: fixed grids, preallocated accumulator.
    Costs one transposed copy of gate|up (``w_in_t``) beside the packed layout.
    """

    def __init__(self, packed: PackedFFN, batch: int, thresholds: torch.Tensor, *, block_k: int | None = None,
                 block_m: int | None = None, block_j: int | None = None, block_d: int | None = None,
                 warps: int = 4) -> None:
        if thresholds.shape != (2,) or thresholds.dtype != torch.float32:
            raise PrunePathError("thresholds must be a float32 [2] tensor (t_in, t_mid): use thresholds_tensor()")
        self.packed, self.batch, self.thresholds = packed, batch, thresholds
        e, r, d = packed.w_in.shape
        self.m = e * r
        self.i = e * packed.neurons_per_expert
        self.w_in_t = packed.w_in.reshape(self.m, d).t().contiguous()  # [d, E·R]: one row per input entry
        self.block_k = block_k or min(next_pow2(d), 32)
        self.block_m = block_m or min(next_pow2(self.m), 256)
        self.block_j = block_j or min(next_pow2(self.i), 32)
        self.block_d = block_d or min(next_pow2(d), 256)
        self.warps = warps
        self.acc = torch.zeros(batch, self.m, dtype=torch.float32, device=packed.device)
        self.grid_in = (triton.cdiv(self.m, self.block_m), triton.cdiv(d, self.block_k), batch)
        self.grid_out = (triton.cdiv(d, self.block_d), triton.cdiv(self.i, self.block_j), batch)

    def set(self, t_in: float | None, t_mid: float | None) -> None:
        """New thresholds in place (a captured graph sees them at its next replay)."""
        self.thresholds.copy_(thresholds_tensor(t_in, t_mid, self.thresholds.device))

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        check_kernel_device(x)
        p, d = self.packed, self.packed.hidden_size
        if x.shape != (self.batch, d) or not x.is_contiguous():
            raise PrunePathError(f"threshold FFN expects a contiguous [{self.batch}, {d}] input, got {tuple(x.shape)}")
        if out.dtype != torch.float32 or out.shape != (self.batch, d) or not out.is_contiguous():
            raise PrunePathError("the threshold FFN accumulates into a contiguous float32 [B, d] output")
        self.acc.zero_()
        _in_kernel[self.grid_in](x, self.w_in_t, self.thresholds, self.acc, d, self.m,
                                 BLOCK_K=self.block_k, BLOCK_M=self.block_m, num_warps=self.warps)
        n = p.neurons_per_expert
        _out_kernel[self.grid_out](
            self.acc, p.b_in if p.b_in is not None else self.acc, p.w_out,
            p.b_out if p.b_out is not None else out, self.thresholds[1:], out, d, self.i, n,
            2 * n if p.gated else n, BLOCK_J=self.block_j, BLOCK_D=self.block_d, GATED=p.gated,
            HAS_BIN=p.b_in is not None, ACT=ACT_IDS[p.activation], HAS_BIAS=p.b_out is not None,
            num_warps=self.warps)
        return out
