"""Fused expert kernels (decode): only the active experts' rows are read, with grids fixed for CUDA graphs.

* ``_experts_in_kernel``: a persistent grid walks work items (slot, neuron block) up to count × blocks; each
  item reads its expert's gate|up (or W_1) rows coalesced, computes act(gate)·up (or act(W_1 x + b)) times the
  token's gate weight, and writes h [cap, n, B] in fp32.
* ``_experts_out_kernel``: work items (column block, group of G slots); each reads the [n, BLOCK_D] slices of
  its G experts' W_down blocks (rows contiguous), reduces them in registers (fp32) and adds the result into
  the output with one atomic add per element, so the output can be the fp32 residual stream itself.

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


@triton.jit
def _experts_in_kernel(x_ptr, w_ptr, b_ptr, ids_ptr, slotw_ptr, count_ptr, h_ptr,
                       B, D, N,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, B_PAD: tl.constexpr,
                       GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, USE_DOT: tl.constexpr,
                       DOT_F32: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    count = tl.load(count_ptr)
    nb = tl.cdiv(N, BLOCK_N)
    R = 2 * N if GATED else N
    offs_b = tl.arange(0, B_PAD)
    mb = offs_b < B
    for item in range(pid, count * nb, nprog):
        s = item // nb
        jb = item - s * nb
        e = tl.load(ids_ptr + s).to(tl.int64)
        offs_n = jb * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        base = w_ptr + e * R * D
        if USE_DOT:
            acc_u = tl.zeros([BLOCK_N, B_PAD], dtype=tl.float32)
            acc_g = tl.zeros([BLOCK_N, B_PAD], dtype=tl.float32)
        else:
            acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mk = offs_k < D
            m2 = mn[:, None] & mk[None, :]
            if GATED:
                up_rows = N + offs_n
            else:
                up_rows = offs_n
            wu = tl.load(base + up_rows[:, None] * D + offs_k[None, :], mask=m2, other=0.0)
            if GATED:
                wg = tl.load(base + offs_n[:, None] * D + offs_k[None, :], mask=m2, other=0.0)
            if USE_DOT:
                xk = tl.load(x_ptr + offs_b[None, :] * D + offs_k[:, None], mask=mb[None, :] & mk[:, None], other=0.0)
                if DOT_F32:  # the CPU interpreter has no bf16 dot
                    xk = xk.to(tl.float32)
                    wu = wu.to(tl.float32)
                acc_u += tl.dot(wu, xk.to(wu.dtype))
                if GATED:
                    if DOT_F32:
                        wg = wg.to(tl.float32)
                    acc_g += tl.dot(wg, xk.to(wg.dtype))
            else:
                xk = tl.load(x_ptr + offs_k, mask=mk, other=0.0).to(tl.float32)
                acc_u += tl.sum(wu.to(tl.float32) * xk[None, :], axis=1)
                if GATED:
                    acc_g += tl.sum(wg.to(tl.float32) * xk[None, :], axis=1)
        if HAS_BIAS:
            if GATED:
                bu = tl.load(b_ptr + e * R + N + offs_n, mask=mn, other=0.0)
                bg = tl.load(b_ptr + e * R + offs_n, mask=mn, other=0.0)
            else:
                bu = tl.load(b_ptr + e * R + offs_n, mask=mn, other=0.0)
                bg = bu
            if USE_DOT:
                acc_u += bu[:, None]
                acc_g += bg[:, None]
            else:
                acc_u += bu
                acc_g += bg
        if GATED:
            h = _act(acc_g, ACT) * acc_u
        else:
            h = _act(acc_u, ACT)
        if USE_DOT:
            w = tl.load(slotw_ptr + s * B + offs_b, mask=mb, other=0.0)
            h = h * w[None, :]
            tl.store(h_ptr + (s * N + offs_n[:, None]) * B + offs_b[None, :], h, mask=mn[:, None] & mb[None, :])
        else:
            w = tl.load(slotw_ptr + s)
            tl.store(h_ptr + s * N + offs_n, h * w, mask=mn)


@triton.jit
def _experts_out_kernel(h_ptr, w_ptr, bias_ptr, ids_ptr, count_ptr, y_ptr,
                        B, D, N,
                        BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr, G: tl.constexpr, B_PAD: tl.constexpr,
                        HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    count = tl.load(count_ptr)
    ncb = tl.cdiv(D, BLOCK_D)
    ngroups = tl.cdiv(count, G)
    offs_g = tl.arange(0, G)
    offs_b = tl.arange(0, B_PAD)
    mb = offs_b < B
    for item in range(pid, ncb * ngroups, nprog):
        grp = item // ncb
        cb = item - grp * ncb
        offs_d = cb * BLOCK_D + tl.arange(0, BLOCK_D)
        md = offs_d < D
        slots = grp * G + offs_g
        ms = slots < count
        e = tl.load(ids_ptr + slots, mask=ms, other=0).to(tl.int64)
        if USE_DOT:
            acc = tl.zeros([B_PAD, BLOCK_D], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j0 in range(0, N, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            mj = offs_j < N
            # [G, BLOCK_J, BLOCK_D]: G experts' row slices in flight at once.
            rows = e[:, None] * N + offs_j[None, :]
            mrow = ms[:, None] & mj[None, :]
            w = tl.load(w_ptr + rows[:, :, None] * D + offs_d[None, None, :],
                        mask=mrow[:, :, None] & md[None, None, :], other=0.0)
            if USE_DOT:
                w2 = tl.reshape(w, [G * BLOCK_J, BLOCK_D])
                hrow = slots[:, None] * N + offs_j[None, :]  # [G, BJ]
                hv = tl.load(h_ptr + tl.reshape(hrow, [G * BLOCK_J])[None, :] * B + offs_b[:, None],
                             mask=tl.reshape(mrow, [G * BLOCK_J])[None, :] & mb[:, None], other=0.0)  # [B_PAD, G*BJ]
                if DOT_F32:
                    acc += tl.dot(hv, w2.to(tl.float32))
                else:
                    acc += tl.dot(hv.to(w2.dtype), w2)
            else:
                hv = tl.load(h_ptr + slots[:, None] * N + offs_j[None, :], mask=mrow, other=0.0)  # [G, BJ]
                acc += tl.sum(tl.sum(hv[:, :, None] * w.to(tl.float32), axis=0), axis=0)
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

    ``run(x, route, out)`` adds the sparse FFN output into ``out`` (fp32 [B, d]).
    """

    def __init__(self, packed: PackedFFN, batch: int, *, block_n: int | None = None, block_k: int | None = None,
                 block_d: int | None = None, block_j: int | None = None, group: int | None = None,
                 programs_per_sm: int = 4, warps_in: int = 4, warps_out: int = 4) -> None:
        self.packed, self.batch = packed, batch
        e, n, d = packed.num_experts, packed.neurons_per_expert, packed.hidden_size
        dev = packed.device
        self.use_dot = batch > 1
        self.b_pad = max(16, next_pow2(batch)) if self.use_dot else 1
        self.dot_f32 = interpreting()
        npow = next_pow2(n)
        self.block_n = block_n or (max(16, min(npow, 32)) if self.use_dot else min(npow, 8))
        self.block_k = block_k or min(next_pow2(d), 512 if self.use_dot else 1024)
        self.block_d = block_d or min(next_pow2(d), 128)
        self.block_j = block_j or (max(16, min(npow, 32)) if self.use_dot else min(npow, 32))
        self.group = group or (1 if self.use_dot else 4)
        if self.use_dot and self.group * self.block_j < 16:
            self.block_j = 16
        self.h = torch.zeros(e, n, batch, dtype=torch.float32, device=dev)
        sms = num_sms(dev)
        items_in = e * triton.cdiv(n, self.block_n)
        items_out = triton.cdiv(d, self.block_d) * triton.cdiv(e, self.group)
        self.grid_in = (max(1, min(items_in, sms * programs_per_sm)),)
        self.grid_out = (max(1, min(items_out, sms * programs_per_sm)),)
        self.warps_in, self.warps_out = warps_in, warps_out

    def run(self, x: torch.Tensor, ids: torch.Tensor, slot_w: torch.Tensor, count: torch.Tensor,
            out: torch.Tensor) -> torch.Tensor:
        check_kernel_device(x)
        p = self.packed
        n, d = p.neurons_per_expert, p.hidden_size
        if x.shape != (self.batch, d) or not x.is_contiguous():
            raise PrunePathError(f"expert kernels expect a contiguous [{self.batch}, {d}] input, got {tuple(x.shape)}")
        if out.dtype != torch.float32 or out.shape != (self.batch, d) or not out.is_contiguous():
            raise PrunePathError("the expert kernels accumulate into a contiguous float32 [B, d] output")
        b_in = p.b_in if p.b_in is not None else p.w_in
        b_out = p.b_out if p.b_out is not None else out
        _experts_in_kernel[self.grid_in](
            x, p.w_in, b_in, ids, slot_w, count, self.h, self.batch, d, n,
            BLOCK_N=self.block_n, BLOCK_K=self.block_k, B_PAD=self.b_pad, GATED=p.gated,
            HAS_BIAS=p.b_in is not None, ACT=ACT_IDS[p.activation], USE_DOT=self.use_dot, DOT_F32=self.dot_f32,
            num_warps=self.warps_in)
        _experts_out_kernel[self.grid_out](
            self.h, p.w_out, b_out, ids, count, out, self.batch, d, n,
            BLOCK_D=self.block_d, BLOCK_J=self.block_j, G=self.group, B_PAD=self.b_pad,
            HAS_BIAS=p.b_out is not None, USE_DOT=self.use_dot, DOT_F32=self.dot_f32, num_warps=self.warps_out)
        return out
