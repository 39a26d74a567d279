"""Dense-equivalent and grouped PrunePath FFNs (batch > 1 decode, prefill), same semantics as the sparse kernels.

* :class:`GatedDense` — one cuBLAS GEMM over ``w_in`` and the router rows together (``PackedFFN.w_in_router``,
  no copy; fp32 output where cuBLAS offers it), then one Triton kernel (``_gate_act_kernel``) that runs the
  selection rule on each token's logits (the routing kernel's own ``_keep_one``, so ties and always-on experts
  agree) and writes h = act(gate)·up·gate-weight (0 for dropped experts), then a cuBLAS GEMM over ``w_out``.
  Every expert's bytes are read, so it costs the dense FFN plus the router rows (+1 % of the bytes for
  Llama-3-8B) — the right path when most experts are active (τ > 1, batch 8 union, prefill).
* :func:`grouped_ffn` — prefill by expert: tokens sorted by expert, ``torch._grouped_mm`` (CUDA bf16 sm90; also
  CPU) over the experts' blocks, or a per-expert loop where it is unavailable; results scattered back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prunepath.errors import PrunePathError
from prunepath.kernels._common import DeviceBudget, budget_tensors, check_kernel_device, next_pow2
from prunepath.kernels.experts import ACT_IDS, ROUNDING, _act, _round
from prunepath.kernels.layout import PackedFFN, _act_reference
from prunepath.kernels.route import RULE_IDS, _keep_one
from prunepath.routing.config import TAU_ALL


@triton.jit
def _gate_act_kernel(pre_ptr, bin_ptr, ao_ptr, tau_ptr, k_ptr, h_ptr, w_ptr, thr_ptr,
                     E, N, R, stride_pre, log_off, gate_offset,
                     E_PAD: tl.constexpr, BJ: tl.constexpr, RULE: tl.constexpr, GATES: tl.constexpr,
                     GATED: tl.constexpr, HAS_BIN: tl.constexpr, ACT: tl.constexpr, WRITE_W: tl.constexpr,
                     COMPUTE_H: tl.constexpr, HAS_THR: tl.constexpr = False, ROUND: tl.constexpr = 0):
    """Program (token b, neuron chunk jc): the token's selection (every program of the row repeats it: no
    inter-program dependency), then h[b, e, j] for every expert e and the chunk's neurons j. HAS_THR: h rounded
    to the model dtype, entries with |h| ≤ t_mid (thr_ptr[1]) zeroed before the gate weight (in-expert
    thresholds; the pre-activations then come from the masked input, the logits from the unmasked one)."""
    b = tl.program_id(0).to(tl.int64)
    jc = tl.program_id(1)
    offs = tl.arange(0, E_PAD)
    valid = offs < E
    row = pre_ptr + b * stride_pre
    lg = tl.load(row + log_off + offs, mask=valid, other=0.0).to(tl.float32)
    ao = (tl.load(ao_ptr + offs, mask=valid, other=0) != 0) & valid
    tau = tl.load(tau_ptr)
    kk = tl.load(k_ptr)
    keep = valid
    if RULE != 3:
        if RULE == 2:
            run = kk < E
        else:
            run = tau <= 1.0  # τ > 1 keeps every expert: skip the sort
        if run:
            keep = _keep_one(lg, ao, valid, offs, tau, kk, E_PAD, RULE)
    if GATES:
        w = tl.sigmoid(lg + gate_offset)
    else:
        w = tl.full([E_PAD], 1.0, tl.float32)
    w = tl.where(keep, w, 0.0)
    if WRITE_W:
        if jc == 0:
            tl.store(w_ptr + b * E + offs, w, mask=valid)
    if COMPUTE_H:
        offs_j = jc * BJ + tl.arange(0, BJ)
        mj = offs_j < N
        m2 = valid[:, None] & mj[None, :]
        base = offs[:, None] * R + offs_j[None, :]
        if GATED:
            g = tl.load(row + base, mask=m2, other=0.0).to(tl.float32)
            u = tl.load(row + base + N, mask=m2, other=0.0).to(tl.float32)
            if HAS_BIN:
                g += tl.load(bin_ptr + base, mask=m2, other=0.0)
                u += tl.load(bin_ptr + base + N, mask=m2, other=0.0)
            h = _act(g, ACT) * u
        else:
            u = tl.load(row + base, mask=m2, other=0.0).to(tl.float32)
            if HAS_BIN:
                u += tl.load(bin_ptr + base, mask=m2, other=0.0)
            h = _act(u, ACT)
        keep_h = m2
        if HAS_THR:
            h = _round(h, ROUND)
            keep_h = m2 & (tl.abs(h) > _round(tl.load(thr_ptr + 1), ROUND))
        h = tl.where(keep_h, h * w[:, None], 0.0)
        tl.store(h_ptr + b * E * N + offs[:, None] * N + offs_j[None, :], h.to(h_ptr.dtype.element_ty), mask=m2)


def masked_input(x: torch.Tensor, thresholds: torch.Tensor | None) -> torch.Tensor:
    """x with the entries |x| ≤ t_in (``thresholds[0]``, compared in x's dtype) zeroed; x itself when None."""
    return x if thresholds is None else x.masked_fill(x.abs() <= thresholds[0], 0)


_MM_F32: dict[str, bool] = {}


def _linear_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T with a float32 result: cuBLAS bf16 GEMM with fp32 output where available (``torch.mm(...,
    out_dtype=)``), else the GEMM in x's dtype then a cast. The router logits need fp32 to select as the
    routing kernel does."""
    if x.dtype == torch.float32 or not x.is_cuda:  # CPU (interpreter tests): plain fp32
        return torch.nn.functional.linear(x.float(), w.float())
    key = x.device.type
    if _MM_F32.get(key, True):
        try:
            y = torch.mm(x, w.t(), out_dtype=torch.float32)
            _MM_F32[key] = True
            return y
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_F32[key] = False
    return torch.nn.functional.linear(x, w).float()


def logits_are_fp32(device: torch.device) -> bool:
    """Whether the fused GEMM produced fp32 logits on this device type (after the first call)."""
    return _MM_F32.get(device.type, True)


class GatedDense(DeviceBudget):
    """The PrunePath FFN computed over every expert (cuBLAS) with the selection mask and gates applied.

    ``ffn(x, out)`` adds FFN(x) into ``out`` (fp32 [B, d]); any B (decode batch or prefill tokens). τ and k live
    in device tensors (``set_tau``), so a captured graph follows them. ``weights`` (float32 [B, E], 0 =
    dropped) is written when ``write_weights`` is set (tests, statistics). ``thresholds``: the float32 [2]
    device tensor (t_in, t_mid) of in-expert thresholds (as :class:`~prunepath.kernels.thresholds.ThresholdFFN`),
    or None: the router reads x, the experts the input with |x| ≤ t_in zeroed (two GEMMs instead of one).
    ``router=False``: the plain FFN (every expert, unscaled; rule "all", no gates, the router rows not read) in
    the same three kernels — the engine's path where no router is needed (an ungated checkpoint at τ > 1, a dense
    model), replacing PyTorch's separate activation, product and residual-add kernels.
    """

    def __init__(self, packed: PackedFFN, *, rule: str = "cumulative", tau: float | torch.Tensor = TAU_ALL,
                 k: int | torch.Tensor | None = None, gates: bool = True, gate_offset: float = 0.0,
                 block_j: int | None = None, num_warps: int = 4,
                 write_weights: bool = False, fp32_logits: bool = True,
                 thresholds: torch.Tensor | None = None, router: bool = True) -> None:
        if not router:
            rule, gates = "all", False
        if rule not in RULE_IDS:
            raise PrunePathError(f"unknown routing rule {rule!r}; choose one of {', '.join(RULE_IDS)}")
        dev = packed.device
        e = packed.num_experts
        self.packed, self.rule, self.gates, self.gate_offset = packed, rule, gates, float(gate_offset)
        self.tau, self.k = budget_tensors(tau, k, e, dev)
        self.e_pad = max(16, next_pow2(e))
        n = packed.neurons_per_expert
        self.block_j = block_j or max(1, min(next_pow2(n), max(1, 4096 // self.e_pad)))
        self.num_warps = num_warps
        self.write_weights = write_weights
        self.weights: torch.Tensor | None = None
        # False: GEMMs in x's dtype (bf16 logits, separate residual add): the A/B variant in case cuBLAS's
        # fp32-output GEMMs are slower on some GPU.
        self.fp32_logits = fp32_logits
        self.router = router
        self._w_cat = packed.w_in_router() if router else None
        self.thresholds = thresholds

    def pre_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """[B, E·R + E] (fused buffer) or [B, E·R] pre-activations + separate logits; returns (buffer, stride)."""
        p = self.packed
        e, r, d = p.w_in.shape
        if self._w_cat is not None and self.thresholds is None:
            if not self.fp32_logits and x.is_cuda:
                return torch.nn.functional.linear(x, self._w_cat), e * r + e
            return _linear_f32(x, self._w_cat), e * r + e
        if not self.router:  # rule "all" without gates reads no logits
            return _linear_f32(masked_input(x, self.thresholds), p.w_in.reshape(e * r, d)), e * r
        pre = torch.empty(x.shape[0], e * r + e, dtype=torch.float32, device=x.device)
        pre[:, : e * r] = _linear_f32(masked_input(x, self.thresholds), p.w_in.reshape(e * r, d))
        pre[:, e * r:] = _linear_f32(x, p.router_w)
        return pre, e * r + e

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """h [B, E·n] in x's dtype: act(gate)·up·gate-weight, 0 for dropped experts."""
        check_kernel_device(x)
        p = self.packed
        e, r, _ = p.w_in.shape
        n = p.neurons_per_expert
        b = x.shape[0]
        pre, stride = self.pre_and_logits(x)
        h = torch.empty(b, e * n, dtype=x.dtype, device=x.device)
        if self.write_weights:
            if self.weights is None or self.weights.shape[0] != b:
                self.weights = torch.empty(b, e, dtype=torch.float32, device=x.device)
        wbuf = self.weights if self.write_weights else pre
        grid = (b, triton.cdiv(n, self.block_j))
        thr = self.thresholds
        _gate_act_kernel[grid](
            pre, p.b_in if p.b_in is not None else pre, p.always_on, self.tau, self.k, h, wbuf,
            thr if thr is not None else pre, e, n, r, stride, e * r if self.router else 0, self.gate_offset,
            E_PAD=self.e_pad, BJ=self.block_j, RULE=RULE_IDS[self.rule], GATES=self.gates, GATED=p.gated,
            HAS_BIN=p.b_in is not None, ACT=ACT_IDS[p.activation], WRITE_W=self.write_weights, COMPUTE_H=True,
            HAS_THR=thr is not None, ROUND=ROUNDING.get(x.dtype, 0), num_warps=self.num_warps)
        return h

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """Gate weights float32 [B, E] (0 = dropped) from fp32 logits [B, E] (no expert work)."""
        check_kernel_device(logits)
        p = self.packed
        e = p.num_experts
        logits = logits.float().contiguous()
        w = torch.empty_like(logits)
        _gate_act_kernel[(logits.shape[0], 1)](
            logits, logits, p.always_on, self.tau, self.k, w, w, logits, e, p.neurons_per_expert, 1, e, 0,
            self.gate_offset, E_PAD=self.e_pad, BJ=1, RULE=RULE_IDS[self.rule], GATES=self.gates,
            GATED=p.gated, HAS_BIN=False, ACT=ACT_IDS[p.activation], WRITE_W=True, COMPUTE_H=False,
            num_warps=self.num_warps)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y [B, d] in x's dtype (b_out included)."""
        p = self.packed
        h = self.hidden(x)
        w_out = p.w_out.reshape(-1, p.hidden_size)
        if p.b_out is not None:
            return torch.addmm(p.b_out.to(x.dtype), h, w_out)
        return h @ w_out

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out += FFN(x). On CUDA the down GEMM accumulates straight into the fp32 ``out`` (cuBLAS bf16 GEMM with
        fp32 C, beta = 1: no separate add, no bf16 rounding of y) where ``addmm(..., out_dtype=)`` exists."""
        p = self.packed
        if (self.fp32_logits and x.is_cuda and x.dtype != torch.float32 and out.dtype == torch.float32
                and _MM_F32.get("addmm", True)):
            h = self.hidden(x)
            w_out = p.w_out.reshape(-1, p.hidden_size)
            try:
                torch.addmm(out, h, w_out, out_dtype=torch.float32, out=out)
                _MM_F32["addmm"] = True
            except (TypeError, RuntimeError, NotImplementedError):
                _MM_F32["addmm"] = False
                out += h @ w_out
            if p.b_out is not None:
                out += p.b_out
            return out
        out += self.forward(x)
        return out


# ---- grouped prefill ------------------------------------------------------------------------------------

GROUPED_USED: dict[str, int] = {}  # which implementation grouped_mm ran (benchmarks record it)


def _grouped_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if a.is_cuda:
        if a.dtype != torch.bfloat16 or torch.cuda.get_device_capability(a.device)[0] < 9:
            return False
    return (a.shape[1] * a.element_size()) % 16 == 0 and (b.shape[-1] * b.element_size()) % 16 == 0


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, counts: list[int] | None = None,
               use_grouped: bool | None = None) -> torch.Tensor:
    """Rows of ``a`` [M, K] grouped by ``offs`` (int32 cumulative ends, one per group of ``b`` [G, K, N]):
    out[rows of g] = a[rows of g] @ b[g]. ``torch._grouped_mm`` where it runs, else a loop over groups."""
    forced = use_grouped is True
    if use_grouped is None:
        use_grouped = _grouped_mm_ok(a, b)
    if use_grouped:
        try:
            y = torch._grouped_mm(a, b, offs=offs)
            GROUPED_USED["torch._grouped_mm"] = GROUPED_USED.get("torch._grouped_mm", 0) + 1
            return y
        except (RuntimeError, NotImplementedError, TypeError):
            if forced:
                raise
    GROUPED_USED["loop"] = GROUPED_USED.get("loop", 0) + 1
    if counts is None:
        counts = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    out = a.new_empty(a.shape[0], b.shape[-1])
    start = 0
    for g, c in enumerate(counts):
        if c:
            torch.mm(a[start:start + c], b[g], out=out[start:start + c])
        start += c
    return out


def grouped_ffn(x: torch.Tensor, packed: PackedFFN, weights: torch.Tensor,
                use_grouped: bool | None = None) -> torch.Tensor:
    """y [T, d] (x's dtype) = Σ_e weights[t, e] · FFN_e(x_t) + b_out, computing only the (token, expert) pairs
    with a nonzero weight: tokens sorted by expert, two grouped GEMMs, a scatter-add back (fp32)."""
    t, d = x.shape
    e, r, _ = packed.w_in.shape
    n = packed.neurons_per_expert
    mask_et = (weights != 0).t()  # [E, T]: nonzero gives pairs sorted by expert, then token
    exp_idx, tok_idx = torch.nonzero(mask_et, as_tuple=True)
    counts_t = mask_et.sum(1)
    offs = torch.cumsum(counts_t, 0).to(torch.int32)
    xs = x.index_select(0, tok_idx)
    pre = grouped_mm(xs, packed.w_in.transpose(1, 2), offs, use_grouped=use_grouped).float()  # [M, R]
    if packed.b_in is not None:
        pre += packed.b_in.index_select(0, exp_idx)
    if packed.gated:
        h = _act_reference(packed.activation, pre[:, :n]) * pre[:, n:]
    else:
        h = _act_reference(packed.activation, pre)
    h = (h * weights[tok_idx, exp_idx].unsqueeze(1)).to(x.dtype)
    ys = grouped_mm(h, packed.w_out, offs, use_grouped=use_grouped)  # [M, d]
    y = torch.zeros(t, d, dtype=torch.float32, device=x.device)
    y.index_add_(0, tok_idx, ys.float())
    if packed.b_out is not None:
        y += packed.b_out
    return y.to(x.dtype)
