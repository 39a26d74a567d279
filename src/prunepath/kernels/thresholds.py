"""Activation-threshold FFN kernels (decode): TEAL-style skipping of weight rows inside the FFN.

An FFN whose every expert runs unscaled (a dense model, or an ungated PrunePath checkpoint at τ > 1) can still
skip bytes inside the FFN: input entries with |x_i| ≤ t_in need not read their column of W_gate / W_up, and
intermediate entries with |h_j| ≤ t_mid need not read their row of W_down. This is the rule of
:meth:`prunepath.routing.ffn.PrunePathFFN.thresholded_forward` (in-expert thresholds) and of TEAL
(:func:`prunepath.baselines.activation.masked_ffn`), so one kernel pair decodes both.

* ``_in_kernel``: gate|up are stored transposed (``w_in_t`` [d, E·R], one contiguous row per input entry), so a
  dropped input entry is a whole row that is never loaded. Programs (column block, chunk of ``k_chunk`` rows,
  token) sum their rows in registers and add the partial pre-activations into an fp32 accumulator (split-K).
* ``_out_kernel``: programs (output block, chunk of ``j_chunk`` neurons, token) finish h = act(gate)·up (or
  act(W_1 x + b)) for their neurons, drop |h| ≤ t_mid, and read only the kept rows of W_down
  (``PackedFFN.w_out``, already one contiguous row per neuron); one atomic add per output element into the fp32
  residual.

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
from prunepath.kernels.experts import ACT_IDS, ROUNDING, _act, _round
from prunepath.kernels.layout import PackedFFN


@triton.jit
def _in_kernel(x_ptr, wt_ptr, t_ptr, acc_ptr, D, M, K_CHUNK,
               BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, ROUND: tl.constexpr):
    """acc[b, m] += Σ_{k in this program's K_CHUNK rows, |x_bk| > t_in} x_bk · w_in_t[k, m]: the rows are
    walked BLOCK_K at a time into a [BLOCK_K, BLOCK_M] register tile, reduced once (not per block of rows), then
    one atomic add per column."""
    mb = tl.program_id(0)
    kc = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = offs_m < M
    # compared as PyTorch compares a tensor with a number: the threshold rounded to the activations' dtype
    t = _round(tl.load(t_ptr), ROUND)
    tile = tl.zeros([BLOCK_K, BLOCK_M], dtype=tl.float32)
    for k0 in range(kc * K_CHUNK, tl.minimum(kc * K_CHUNK + K_CHUNK, D), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < D
        x = tl.load(x_ptr + b * D + offs_k, mask=mk, other=0.0).to(tl.float32)
        keep = mk & (tl.abs(x) > t)
        w = tl.load(wt_ptr + offs_k.to(tl.int64)[:, None] * M + offs_m[None, :], mask=keep[:, None] & mm[None, :],
                    other=0.0)
        tile += w.to(tl.float32) * x[:, None]
    tl.atomic_add(acc_ptr + b * M + offs_m, tl.sum(tile, axis=0), mask=mm, sem="relaxed")


@triton.jit
def _out_kernel(acc_ptr, bin_ptr, w_ptr, bias_ptr, t_ptr, y_ptr, D, I, N, R, J_CHUNK,
                BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, GATED: tl.constexpr, HAS_BIN: tl.constexpr,
                ACT: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND: tl.constexpr):
    """y[b, d] += Σ_{j in this program's J_CHUNK neurons, |h_bj| > t_mid} h_bj · w_out[j, d] (+ b_out once, from
    the first chunk), summed in a [BLOCK_J, BLOCK_D] register tile reduced once, one atomic add per output
    element."""
    db = tl.program_id(0)
    jc = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    md = offs_d < D
    M = (I // N) * R
    # h rounded to the weights' dtype (the model's, as its PyTorch forward holds h), and so is the threshold
    t = _round(tl.load(t_ptr), ROUND)
    tile = tl.zeros([BLOCK_J, BLOCK_D], dtype=tl.float32)
    for j0 in range(jc * J_CHUNK, tl.minimum(jc * J_CHUNK + J_CHUNK, I), BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mj = offs_j < I
        e = offs_j // N
        col = e * R + (offs_j - e * N)  # the neuron's gate (or W_1) column in the expert-packed pre-activations
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
        h = _round(h, ROUND)
        keep = mj & (tl.abs(h) > t)
        h = tl.where(keep, h, 0.0)
        w = tl.load(w_ptr + offs_j.to(tl.int64)[:, None] * D + offs_d[None, :], mask=keep[:, None] & md[None, :],
                    other=0.0)
        tile += h[:, None] * w.to(tl.float32)
    part = tl.sum(tile, axis=0)
    if HAS_BIAS:
        part += tl.load(bias_ptr + offs_d, mask=md, other=0.0) * (jc == 0).to(tl.float32)
    tl.atomic_add(y_ptr + b * D + offs_d, part, mask=md, sem="relaxed")


def thresholds_tensor(t_in: float | None, t_mid: float | None, device: torch.device | str) -> torch.Tensor:
    """float32 [2] device tensor (t_in, t_mid); None becomes :data:`OFF` (keep every entry)."""
    return torch.tensor([OFF if t_in is None else float(t_in), OFF if t_mid is None else float(t_mid)],
                        dtype=torch.float32, device=device)


# Programs per kernel that the automatic rows-per-program choice aims at. From the H200 sweep of
# benchmarks/threshold_ffn.py (benchmarks/results/threshold-ffn-h200.json): at Llama-3-8B's FFN, one block of rows
# per program (14,336 programs, one atomic add per column each) ran at 0.54-0.62x cuBLAS and 8 blocks in / 16 out
# (about 1,800 / 450 programs) at 1.02-1.17x; at SmolLM2's (216 / 120 programs with one block) any chunking was
# slower, as too few programs then share the GPU.
TARGET_PROGRAMS = {"in": 2048, "out": 512}


def _chunk(rows: int, block: int) -> int:
    if rows < block or rows % block:
        raise PrunePathError(f"rows per program ({rows}) must be a positive multiple of the block ({block})")
    return rows


def auto_chunk(programs: int, target: int, block: int) -> int:
    """Rows per program: ``block`` times the power of two nearest to programs / target (at least 1), so a large
    layer runs about ``target`` programs and a small one keeps one block of rows per program."""
    ratio = programs / target
    if ratio <= 1:
        return block
    lo = 1 << (int(ratio).bit_length() - 1)
    return block * (lo if ratio / lo <= 2 * lo / ratio else 2 * lo)


class ThresholdFFN:
    """Decode-time FFN of one layer with activation thresholds: ``ffn(x, out)`` adds FFN(x) into ``out``
    (fp32 [B, d]), reading only the gate|up rows of kept input entries and the W_down rows of kept neurons.

    ``thresholds``: float32 [2] device tensor (t_in, t_mid), e.g. a view of the engine's per-model tensor
    (:func:`thresholds_tensor`; :data:`OFF` = no masking). Graph-safe: fixed grids, preallocated accumulator.
    Costs one transposed copy of gate|up (``w_in_t``) beside the packed layout.
    """

    def __init__(self, packed: PackedFFN, batch: int, thresholds: torch.Tensor, *, block_k: int | None = None,
                 block_m: int | None = None, block_j: int | None = None, block_d: int | None = None,
                 k_chunk: int | None = None, j_chunk: int | None = None, warps: int = 4) -> None:
        if thresholds.shape != (2,) or thresholds.dtype != torch.float32:
            raise PrunePathError("thresholds must be a float32 [2] tensor (t_in, t_mid): use thresholds_tensor()")
        self.packed, self.batch, self.thresholds = packed, batch, thresholds
        e, r, d = packed.w_in.shape
        self.m = e * r
        self.i = e * packed.neurons_per_expert
        self.w_in_t = packed.w_in.reshape(self.m, d).t().contiguous()  # [d, E·R]: one row per input entry
        self.block_k = block_k or min(next_pow2(d), 64)
        self.block_m = block_m or min(next_pow2(self.m), 128)
        self.block_j = block_j or min(next_pow2(self.i), 64)
        self.block_d = block_d or min(next_pow2(d), 128)
        # rows (neurons) per program, a multiple of the block: fewer atomics and less per-program overhead on
        # large layers (None: auto_chunk towards TARGET_PROGRAMS)
        one_in = triton.cdiv(self.m, self.block_m) * triton.cdiv(d, self.block_k)
        one_out = triton.cdiv(d, self.block_d) * triton.cdiv(self.i, self.block_j)
        self.k_chunk = _chunk(k_chunk or auto_chunk(one_in, TARGET_PROGRAMS["in"], self.block_k), self.block_k)
        self.j_chunk = _chunk(j_chunk or auto_chunk(one_out, TARGET_PROGRAMS["out"], self.block_j), self.block_j)
        self.warps = warps
        self.acc = torch.zeros(batch, self.m, dtype=torch.float32, device=packed.device)
        self.grid_in = (triton.cdiv(self.m, self.block_m), triton.cdiv(d, self.k_chunk), batch)
        self.grid_out = (triton.cdiv(d, self.block_d), triton.cdiv(self.i, self.j_chunk), batch)

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
        _in_kernel[self.grid_in](x, self.w_in_t, self.thresholds, self.acc, d, self.m, self.k_chunk,
                                 BLOCK_K=self.block_k, BLOCK_M=self.block_m, ROUND=ROUNDING.get(x.dtype, 0),
                                 num_warps=self.warps)
        n = p.neurons_per_expert
        _out_kernel[self.grid_out](
            self.acc, p.b_in if p.b_in is not None else self.acc, p.w_out,
            p.b_out if p.b_out is not None else out, self.thresholds[1:], out, d, self.i, n,
            2 * n if p.gated else n, self.j_chunk, BLOCK_J=self.block_j, BLOCK_D=self.block_d, GATED=p.gated,
            HAS_BIN=p.b_in is not None, ACT=ACT_IDS[p.activation], HAS_BIAS=p.b_out is not None,
            ROUND=ROUNDING.get(p.w_out.dtype, 0), num_warps=self.warps)
        return out
