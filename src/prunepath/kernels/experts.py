"""Fused expert kernels (decode): only the active experts' rows are read, with grids fixed for CUDA graphs.

* ``_experts_in_kernel``: a persistent grid walks work items (slot, K-chunk) up to count × chunks; each item
  reads its expert's whole gate|up (or W_1) block over one K-chunk (every row a contiguous run) and adds its
  partial pre-activations into an fp32 accumulator (split-K: short dependency chains, even load balance).
* ``_experts_out_kernel``: work items (column block, group of G slots); each finishes the activations
  (act(gate)·up, or act(W_1 x + b), times the token's gate weight), reads the [n, BLOCK_D] slices of its G
  experts' W_down blocks (rows contiguous), reduces in fp32 registers and adds the result into the output
  with one atomic add per element, so the output can be the fp32 residual stream itself.

Items past the active count are never visited, so the bytes read shrink with the experts actually used.
Expert widths that are not a multiple of the block size are masked. Batch > 1 runs the union of the
tokens' experts (slot weights are 0 for tokens that did not pick an expert) with tensor-core dots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prunepath.errors import PrunePathError
from prunepath.kernels._common import check_kernel_device, interpreting, next_pow2, num_sms
from prunepath.kernels.layout import PackedFFN

ACT_IDS = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3}


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 0:
        return x * tl.sigmoid(x)
    elif ACT == 1:
        # tanh(z) = 2·sigmoid(2z) − 1 (no tanh in every Triton backend)
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (2.0 * tl.sigmoid(2.0 * z))
    elif ACT == 2:
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    else:
        return tl.maximum(x, 0.0)


ROUNDING = {torch.bfloat16: 1, torch.float16: 2}  # the model dtype the kernels round to (else 0: none)


@triton.jit
def _round(v, ROUND: tl.constexpr):
    """fp32 ``v`` rounded to nearest-even in the model's dtype, back in fp32 (ROUND 1: bf16, by the bits, which
    the CPU interpreter's casts would truncate; 2: fp16; 0: unchanged)."""
    if ROUND == 1:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif ROUND == 2:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def _experts_in_kernel(x_ptr, w_ptr, ids_ptr, count_ptr, acc_ptr, thr_ptr,
                       B, D, R,
                       R_PAD: tl.constexpr, BLOCK_K: tl.constexpr, B_PAD: tl.constexpr,
                       USE_DOT: tl.constexpr, DOT_F32: tl.constexpr, HAS_THR: tl.constexpr, ROUND: tl.constexpr):
    """Split-K: item (slot, K-chunk) reads the expert's whole gate|up block over BLOCK_K columns (R rows,
    each a contiguous run) and atomically adds its partial pre-activations into acc [cap, R, B]. HAS_THR: input
    entries with |x| ≤ t_in (thr_ptr[0], rounded to the model dtype) count as 0 (in-expert thresholds; the
    router has read the unmasked x already)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    count = tl.load(count_ptr)
    t_in = 0.0
    if HAS_THR:
        t_in = _round(tl.load(thr_ptr), ROUND)
    nk = tl.cdiv(D, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mr = offs_r < R
    offs_b = tl.arange(0, B_PAD)
    mb = offs_b < B
    for item in range(pid, count * nk, nprog):
        s = item // nk
        kb = item - s * nk
        e = tl.load(ids_ptr + s).to(tl.int64)
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mk = offs_k < D
        w = tl.load(w_ptr + e * R * D + offs_r[:, None] * D + offs_k[None, :], mask=mr[:, None] & mk[None, :],
                    other=0.0)
        if USE_DOT:
            xk = tl.load(x_ptr + offs_b[None, :] * D + offs_k[:, None], mask=mb[None, :] & mk[:, None], other=0.0)
            if HAS_THR:
                xk = tl.where(tl.abs(xk.to(tl.float32)) > t_in, xk, 0.0)
            if DOT_F32:  # the CPU interpreter has no bf16 dot
                part = tl.dot(w.to(tl.float32), xk.to(tl.float32))
            else:
                part = tl.dot(w, xk.to(w.dtype))
            tl.atomic_add(acc_ptr + (s * R + offs_r[:, None]) * B + offs_b[None, :], part,
                          mask=mr[:, None] & mb[None, :], sem="relaxed")
        else:
            xk = tl.load(x_ptr + offs_k, mask=mk, other=0.0).to(tl.float32)
            if HAS_THR:
                xk = tl.where(tl.abs(xk) > t_in, xk, 0.0)
            part = tl.sum(w.to(tl.float32) * xk[None, :], axis=1)
            tl.atomic_add(acc_ptr + s * R + offs_r, part, mask=mr, sem="relaxed")


@triton.jit
def _experts_out_kernel(acc_ptr, bin_ptr, slotw_ptr, w_ptr, bias_ptr, ids_ptr, count_ptr, y_ptr, thr_ptr,
                        B, D, N,
                        BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr, G: tl.constexpr, B_PAD: tl.constexpr,
                        GATED: tl.constexpr, HAS_BIN: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                        USE_DOT: tl.constexpr, DOT_F32: tl.constexpr, HAS_THR: tl.constexpr, ROUND: tl.constexpr):
    """Item (column block, group of G slots): h = act(gate)·up·gate-weight from the finished pre-activations,
    then a [G·BLOCK_J, BLOCK_D] tile of W_down rows (G experts' row slices, each row a contiguous run),
    reduced in fp32 and atomically added into y. HAS_THR: h is rounded to the model dtype and entries with
    |h| ≤ t_mid (thr_ptr[1]) are dropped before the gate weight, as the PyTorch forward drops them; at batch 1
    their W_down rows are not loaded."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    count = tl.load(count_ptr)
    t_mid = 0.0
    if HAS_THR:
        t_mid = _round(tl.load(thr_ptr + 1), ROUND)
    ncb = tl.cdiv(D, BLOCK_D)
    ngroups = tl.cdiv(count, G)
    R = 2 * N if GATED else N
    UP0 = N if GATED else 0
    GJ: tl.constexpr = G * BLOCK_J
    offs_f = tl.arange(0, GJ)
    f_g = offs_f // BLOCK_J  # slot within the group
    f_j = offs_f - f_g * BLOCK_J  # neuron within the block
    offs_b = tl.arange(0, B_PAD)
    mb = offs_b < B
    for item in range(pid, ncb * ngroups, nprog):
        grp = item // ncb
        cb = item - grp * ncb
        offs_d = cb * BLOCK_D + tl.arange(0, BLOCK_D)
        md = offs_d < D
        slot = grp * G + f_g
        ms = slot < count
        e = tl.load(ids_ptr + slot, mask=ms, other=0).to(tl.int64)
        if USE_DOT:
            acc = tl.zeros([B_PAD, BLOCK_D], dtype=tl.float32)
            sw = tl.load(slotw_ptr + slot[None, :] * B + offs_b[:, None], mask=ms[None, :] & mb[:, None], other=0.0)
        else:
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            sw = tl.load(slotw_ptr + slot, mask=ms, other=0.0)
        for j0 in range(0, N, BLOCK_J):
            jj = j0 + f_j
            m = ms & (jj < N)
            if USE_DOT:
                w = tl.load(w_ptr + (e * N + jj)[:, None] * D + offs_d[None, :], mask=m[:, None] & md[None, :],
                            other=0.0)  # [GJ, BD]
                m2 = m[None, :] & mb[:, None]
                up = tl.load(acc_ptr + ((slot * R + UP0 + jj) * B)[None, :] + offs_b[:, None], mask=m2, other=0.0)
                if HAS_BIN:
                    up += tl.load(bin_ptr + (e * R + UP0 + jj)[None, :], mask=m[None, :], other=0.0)
                if GATED:
                    g = tl.load(acc_ptr + ((slot * R + jj) * B)[None, :] + offs_b[:, None], mask=m2, other=0.0)
                    if HAS_BIN:
                        g += tl.load(bin_ptr + (e * R + jj)[None, :], mask=m[None, :], other=0.0)
                    h = _act(g, ACT) * up
                else:
                    h = _act(up, ACT)
                if HAS_THR:
                    h = _round(h, ROUND)
                    m2 = m2 & (tl.abs(h) > t_mid)
                h = tl.where(m2, h * sw, 0.0)  # [B_PAD, GJ]
                if DOT_F32:
                    acc += tl.dot(h, w.to(tl.float32))
                else:
                    acc += tl.dot(h.to(w.dtype), w)
            else:
                if not HAS_THR:  # issued before h is known: the load overlaps the activation math
                    w = tl.load(w_ptr + (e * N + jj)[:, None] * D + offs_d[None, :], mask=m[:, None] & md[None, :],
                                other=0.0)  # [GJ, BD]
                up = tl.load(acc_ptr + slot * R + UP0 + jj, mask=m, other=0.0)
                if HAS_BIN:
                    up += tl.load(bin_ptr + e * R + UP0 + jj, mask=m, other=0.0)
                if GATED:
                    g = tl.load(acc_ptr + slot * R + jj, mask=m, other=0.0)
                    if HAS_BIN:
                        g += tl.load(bin_ptr + e * R + jj, mask=m, other=0.0)
                    h = _act(g, ACT) * up
                else:
                    h = _act(up, ACT)
                if HAS_THR:  # dropped entries' W_down rows are never loaded
                    h = _round(h, ROUND)
                    m = m & (tl.abs(h) > t_mid)
                    w = tl.load(w_ptr + (e * N + jj)[:, None] * D + offs_d[None, :],
                                mask=m[:, None] & md[None, :], other=0.0)  # [GJ, BD]
                h = tl.where(m, h * sw, 0.0)  # [GJ]
                acc += tl.sum(h[:, None] * w.to(tl.float32), axis=0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d, mask=md, other=0.0) * (grp == 0).to(tl.float32)
            if USE_DOT:
                acc += bias[None, :]
            else:
                acc += bias
        if USE_DOT:
            tl.atomic_add(y_ptr + offs_b[:, None] * D + offs_d[None, :], acc, mask=mb[:, None] & md[None, :],
                          sem="relaxed")
        else:
            tl.atomic_add(y_ptr + offs_d, acc, mask=md, sem="relaxed")


class ExpertRunner:
    """Preallocated buffers and fixed grids for one packed layer and batch size (CUDA-graph safe).

    ``run(x, ids, slot_w, count, out)`` adds the sparse FFN output into ``out`` (fp32 [B, d]). ``acc`` is the
    split-K accumulator; the routing kernel clears it when it is given this buffer (``Router(zero=acc)``),
    otherwise pass ``clear=True``.
    """

    def __init__(self, packed: PackedFFN, batch: int, *, block_k: int | None = None,
                 block_d: int | None = None, block_j: int | None = None, group: int | None = None,
                 programs_per_sm: int = 16, warps_in: int = 4, warps_out: int = 4) -> None:
        self.packed, self.batch = packed, batch
        e, n, d = packed.num_experts, packed.neurons_per_expert, packed.hidden_size
        r = 2 * n if packed.gated else n
        dev = packed.device
        self.use_dot = batch > 1
        self.b_pad = max(16, next_pow2(batch)) if self.use_dot else 1
        self.dot_f32 = interpreting()
        npow = next_pow2(n)
        self.r_pad = max(16, next_pow2(r))
        self.block_k = block_k or min(next_pow2(d), max(16, 16384 // self.r_pad))
        self.block_d = block_d or min(next_pow2(d), 64)
        self.block_j = block_j or (max(16, min(npow, 32)) if self.use_dot else min(npow, 32))
        self.group = group or (1 if self.use_dot else 4)
        if self.use_dot and self.group * self.block_j < 16:
            self.block_j = 16
        if self.group & (self.group - 1) or self.block_j & (self.block_j - 1):
            raise PrunePathError("group and block_j must be powers of two")
        self.acc = torch.zeros(e * r * batch, dtype=torch.float32, device=dev)
        sms = num_sms(dev)
        items_in = e * triton.cdiv(d, self.block_k)
        items_out = triton.cdiv(d, self.block_d) * triton.cdiv(e, self.group)
        self.grid_in = (max(1, min(items_in, sms * programs_per_sm)),)
        self.grid_out = (max(1, min(items_out, sms * programs_per_sm)),)
        self.warps_in, self.warps_out = warps_in, warps_out

    def run(self, x: torch.Tensor, ids: torch.Tensor, slot_w: torch.Tensor, count: torch.Tensor,
            out: torch.Tensor, clear: bool = True, thresholds: torch.Tensor | None = None) -> torch.Tensor:
        """``thresholds``: float32 [2] device tensor (t_in, t_mid) of in-expert thresholds, or None."""
        check_kernel_device(x)
        p = self.packed
        n, d = p.neurons_per_expert, p.hidden_size
        r = 2 * n if p.gated else n
        if x.shape != (self.batch, d) or not x.is_contiguous():
            raise PrunePathError(f"expert kernels expect a contiguous [{self.batch}, {d}] input, got {tuple(x.shape)}")
        if out.dtype != torch.float32 or out.shape != (self.batch, d) or not out.is_contiguous():
            raise PrunePathError("the expert kernels accumulate into a contiguous float32 [B, d] output")
        if clear:
            self.acc.zero_()
        b_in = p.b_in if p.b_in is not None else self.acc
        b_out = p.b_out if p.b_out is not None else out
        has_thr = thresholds is not None
        thr = thresholds if has_thr else count
        _experts_in_kernel[self.grid_in](
            x, p.w_in, ids, count, self.acc, thr, self.batch, d, r,
            R_PAD=self.r_pad, BLOCK_K=self.block_k, B_PAD=self.b_pad, USE_DOT=self.use_dot, DOT_F32=self.dot_f32,
            HAS_THR=has_thr, ROUND=ROUNDING.get(x.dtype, 0), num_warps=self.warps_in)
        _experts_out_kernel[self.grid_out](
            self.acc, b_in, slot_w, p.w_out, b_out, ids, count, out, thr, self.batch, d, n,
            BLOCK_D=self.block_d, BLOCK_J=self.block_j, G=self.group, B_PAD=self.b_pad, GATED=p.gated,
            HAS_BIN=p.b_in is not None, ACT=ACT_IDS[p.activation], HAS_BIAS=p.b_out is not None,
            USE_DOT=self.use_dot, DOT_F32=self.dot_f32, HAS_THR=has_thr, ROUND=ROUNDING.get(p.w_out.dtype, 0),
            num_warps=self.warps_out)
        return out
