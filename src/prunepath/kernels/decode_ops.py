"""Small fused kernels for the decode step: norm (fp32 residual → bf16), RoPE + KV-cache write, and split-KV
single-query attention (GQA). Each replaces several PyTorch launches; in a CUDA graph launches are the cost."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from prunepath.kernels._common import check_kernel_device, interpreting, next_pow2


@triton.jit
def _norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, D, eps, offset,
                 BLOCK: tl.constexpr, RMS: tl.constexpr, HAS_BIAS: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=m, other=0.0).to(tl.float32)
    if RMS:
        var = tl.sum(x * x, 0) / D
        y = x * tl.rsqrt(var + eps)
    else:
        mean = tl.sum(x, 0) / D
        xc = tl.where(m, x - mean, 0.0)
        var = tl.sum(xc * xc, 0) / D
        y = xc * tl.rsqrt(var + eps)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32) + offset
    y = y * w
    if HAS_BIAS:
        y += tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + offs, y.to(y_ptr.dtype.element_ty), mask=m)


def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, *, rms: bool,
         offset: float = 0.0, out: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """RMSNorm / LayerNorm of rows of ``x`` (any float dtype, usually the fp32 residual) into ``out_dtype``."""
    check_kernel_device(x)
    d = x.shape[-1]
    rows = x.numel() // d
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    _norm_kernel[(rows,)](x, weight, bias if bias is not None else weight, out, d, float(eps), float(offset),
                          BLOCK=next_pow2(d), RMS=rms, HAS_BIAS=bias is not None, num_warps=4 if d <= 2048 else 8)
    return out


@triton.jit
def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, kc_ptr, vc_ptr,
                       H, KVH, T_MAX, HD_HALF: tl.constexpr, HD: tl.constexpr, ROPE: tl.constexpr):
    b = tl.program_id(0)
    hh = tl.program_id(1)
    pos = tl.load(pos_ptr)
    nh = H + 2 * KVH
    offs = tl.arange(0, HD_HALF)
    src = qkv_ptr + (b * nh + hh) * HD
    x1 = tl.load(src + offs).to(tl.float32)
    x2 = tl.load(src + HD_HALF + offs).to(tl.float32)
    y1 = x1
    y2 = x2
    if ROPE:
        if hh < H + KVH:
            c1 = tl.load(cos_ptr + pos * HD + offs)
            c2 = tl.load(cos_ptr + pos * HD + HD_HALF + offs)
            s1 = tl.load(sin_ptr + pos * HD + offs)
            s2 = tl.load(sin_ptr + pos * HD + HD_HALF + offs)
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
    if hh < H:
        dst = q_ptr + (b * H + hh) * HD
    elif hh < H + KVH:
        dst = kc_ptr + ((b * KVH + (hh - H)) * T_MAX + pos) * HD
    else:
        dst = vc_ptr + ((b * KVH + (hh - H - KVH)) * T_MAX + pos) * HD
    tl.store(dst + offs, y1.to(dst.dtype.element_ty))
    tl.store(dst + HD_HALF + offs, y2.to(dst.dtype.element_ty))


def rope_and_cache(qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, pos: torch.Tensor,
                   q_out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int) -> None:
    """Split one token's fused q|k|v [B, (H+2·KVH)·hd], rotate q and k at position ``pos`` (HF rotate-half
    convention; cos/sin [T, hd] fp32, None = no RoPE), write q to ``q_out`` [B, H, hd] and k, v into the caches
    [B, KVH, T, hd] at ``pos``."""
    check_kernel_device(qkv)
    b = qkv.shape[0]
    hd = q_out.shape[-1]
    rope = cos is not None
    _rope_cache_kernel[(b, heads + 2 * kv_heads)](
        qkv, cos if rope else qkv, sin if rope else qkv, pos, q_out, k_cache, v_cache, heads, kv_heads,
        k_cache.shape[2], HD_HALF=hd // 2, HD=hd, ROPE=rope, num_warps=1)


@triton.jit
def _attn_split_kernel(q_ptr, kc_ptr, vc_ptr, pos_ptr, o_ptr, lse_ptr, H, KVH, T_MAX, NSPLIT, scale,
                       GROUP: tl.constexpr, G_PAD: tl.constexpr, HD: tl.constexpr, CHUNK: tl.constexpr,
                       BLOCK_T: tl.constexpr, DOT_F32: tl.constexpr):
    bk = tl.program_id(0)
    sp = tl.program_id(1)
    b = bk // KVH
    kvh = bk - b * KVH
    length = tl.load(pos_ptr) + 1
    start = sp * CHUNK
    offs_g = tl.arange(0, G_PAD)
    mg = offs_g < GROUP
    offs_d = tl.arange(0, HD)
    heads = kvh * GROUP + offs_g
    if start < length:
        q = tl.load(q_ptr + (b * H + heads[:, None]) * HD + offs_d[None, :], mask=mg[:, None], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], dtype=tl.float32)
        acc = tl.zeros([G_PAD, HD], dtype=tl.float32)
        kbase = kc_ptr + (b * KVH + kvh) * T_MAX * HD
        vbase = vc_ptr + (b * KVH + kvh) * T_MAX * HD
        for t0 in range(start, start + CHUNK, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mt = offs_t < length
            k = tl.load(kbase + offs_t[:, None] * HD + offs_d[None, :], mask=mt[:, None], other=0.0)
            v = tl.load(vbase + offs_t[:, None] * HD + offs_d[None, :], mask=mt[:, None], other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(mt[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        o = acc / tl.maximum(l_i, 1e-30)[:, None]
        lse = m_i + tl.log(tl.maximum(l_i, 1e-30))
        tl.store(o_ptr + ((b * H + heads[:, None]) * NSPLIT + sp) * HD + offs_d[None, :], o, mask=mg[:, None])
        tl.store(lse_ptr + (b * H + heads) * NSPLIT + sp, lse, mask=mg)


@triton.jit
def _attn_combine_kernel(o_ptr, lse_ptr, pos_ptr, out_ptr, NSPLIT, CHUNK,
                         S_PAD: tl.constexpr, HD: tl.constexpr):
    bh = tl.program_id(0)
    length = tl.load(pos_ptr) + 1
    nvalid = tl.cdiv(length, CHUNK)
    offs_s = tl.arange(0, S_PAD)
    ms = offs_s < nvalid
    lse = tl.load(lse_ptr + bh * NSPLIT + offs_s, mask=ms, other=float("-inf"))
    mx = tl.max(lse, 0)
    w = tl.where(ms, tl.exp(lse - mx), 0.0)
    w = w / tl.sum(w, 0)
    offs_d = tl.arange(0, HD)
    o = tl.load(o_ptr + (bh * NSPLIT + offs_s[:, None]) * HD + offs_d[None, :], mask=ms[:, None], other=0.0)
    res = tl.sum(o * w[:, None], 0)
    tl.store(out_ptr + bh * HD + offs_d, res.to(out_ptr.dtype.element_ty))


class DecodeAttention:
    """Split-KV attention of one query per sequence over a static cache, graph-safe (length read on device)."""

    def __init__(self, batch: int, heads: int, kv_heads: int, head_dim: int, max_len: int, device: torch.device,
                 chunk: int = 64, block_t: int = 32) -> None:
        if head_dim & (head_dim - 1):
            raise ValueError("head_dim must be a power of two for the decode attention kernel")
        self.batch, self.heads, self.kv_heads, self.head_dim = batch, heads, kv_heads, head_dim
        self.group = heads // kv_heads
        self.chunk, self.block_t = chunk, min(block_t, chunk)
        self.nsplit = triton.cdiv(max_len, chunk)
        self.max_len = max_len
        self.o = torch.empty(batch, heads, self.nsplit, head_dim, dtype=torch.float32, device=device)
        self.lse = torch.empty(batch, heads, self.nsplit, dtype=torch.float32, device=device)
        self.scale = 1.0 / math.sqrt(head_dim)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                 out: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """q [B, H, hd]; attends to cache positions 0..pos inclusive; writes out [B, H, hd]."""
        check_kernel_device(q)
        g_pad = max(16, next_pow2(self.group))
        _attn_split_kernel[(self.batch * self.kv_heads, self.nsplit)](
            q, k_cache, v_cache, pos, self.o, self.lse, self.heads, self.kv_heads, k_cache.shape[2], self.nsplit,
            float(scale if scale is not None else self.scale), GROUP=self.group, G_PAD=g_pad, HD=self.head_dim,
            CHUNK=self.chunk, BLOCK_T=self.block_t, DOT_F32=interpreting(), num_warps=4)
        _attn_combine_kernel[(self.batch * self.heads,)](
            self.o, self.lse, pos, out, self.nsplit, self.chunk, S_PAD=max(2, next_pow2(self.nsplit)),
            HD=self.head_dim, num_warps=4)
        return out
