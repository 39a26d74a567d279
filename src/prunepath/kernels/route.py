"""Routing kernel (decode): router logits → softmax → selection rule → gates → compacted active experts.

One launch, no host synchronisation. Programs (expert-block, token) compute a slice of the router GEMV; the
last program to finish (an atomic ticket) runs the selection for every token of the batch: a bitonic sort of
packed (probability, index) keys gives ranks with ties to the lower index, a cumulative sum gives the paper's
inclusive mass, and the union of active experts over the batch is compacted in ascending expert order
(ids, per-token slot weights, count). τ and k live in device tensors, so they change without recapturing a
CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prunepath.errors import PrunePathError
from prunepath.kernels._common import DeviceBudget, budget_tensors, check_kernel_device, next_pow2
from prunepath.kernels.layout import PackedFFN
from prunepath.routing.config import TAU_ALL

RULE_IDS = {"cumulative": 0, "nucleus": 1, "topk": 2, "all": 3}


@triton.jit
def _select_rows(logits_ptr, keep_ptr, wdense_ptr, ids_ptr, slotw_ptr, count_ptr, ao_ptr, tau_ptr, k_ptr,
                 B, E, gate_offset,
                 E_PAD: tl.constexpr, RULE: tl.constexpr, GATES: tl.constexpr):
    offs = tl.arange(0, E_PAD)
    valid = offs < E
    ao = tl.load(ao_ptr + offs, mask=valid, other=0) != 0
    tau = tl.load(tau_ptr)
    kk = tl.load(k_ptr)
    for b in range(0, B):
        lg = tl.load(logits_ptr + b * E + offs, mask=valid, other=0.0)
        cand = valid & (ao == 0)
        sel = tl.where(cand, lg, float("-inf"))
        mx = tl.max(sel, 0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)  # every expert always-on: no softmax at all
        ex = tl.where(cand, tl.exp(sel - mx), 0.0)
        p = ex / tl.maximum(tl.sum(ex, 0), 1e-30)
        # Sortable key: positive fp32 bits are monotonic as integers; low word favours the lower index on ties.
        # Non-candidates get key -1 and sort last.
        bits = p.to(tl.int32, bitcast=True).to(tl.int64)
        key = tl.where(cand, (bits << 32) | (E_PAD - 1 - offs).to(tl.int64), -1)
        skey = tl.sort(key, descending=True)
        ps = tl.where(skey >= 0, (skey >> 32).to(tl.int32).to(tl.float32, bitcast=True), 0.0)
        sidx = (E_PAD - 1 - (skey & 0xFFFFFFFF)).to(tl.int32)
        scand = skey >= 0
        cum = tl.cumsum(ps, 0)
        thr = tl.where(tau > 1.0, float("inf"), tau)  # tau > 1 keeps every expert (as the core rule does)
        if RULE == 0:  # cumulative (paper): inclusive mass strictly below tau; rank 0 always kept
            keep_s = (cum < thr) | (offs == 0)
        elif RULE == 1:  # nucleus: exclusive mass below tau (keeps the crossing expert)
            keep_s = ((cum - ps) < thr) | (offs == 0)
        elif RULE == 2:  # top-k
            keep_s = offs < kk
        else:
            keep_s = offs >= 0
        keep_s = keep_s & scand
        # Scatter the sorted decision back to expert order; always-on experts join here.
        tl.store(keep_ptr + b * E + sidx, keep_s.to(tl.int8), mask=scand)
        tl.debug_barrier()
        keep = (tl.load(keep_ptr + b * E + offs, mask=valid, other=0) != 0) & cand
        keep = keep | (ao & valid)
        if GATES:
            w = tl.sigmoid(lg + gate_offset)
        else:
            w = tl.full([E_PAD], 1.0, tl.float32)
        w = tl.where(keep, w, 0.0)
        tl.store(keep_ptr + b * E + offs, keep.to(tl.int8), mask=valid)
        tl.store(wdense_ptr + b * E + offs, w, mask=valid)
    tl.debug_barrier()
    # Union over the batch, compacted in ascending expert order.
    union = offs < 0
    for b in range(0, B):
        union = union | (tl.load(keep_ptr + b * E + offs, mask=valid, other=0) != 0)
    ui = union.to(tl.int32)
    pos = tl.cumsum(ui, 0) - ui
    tl.store(ids_ptr + pos, offs, mask=union)
    for b in range(0, B):
        w = tl.load(wdense_ptr + b * E + offs, mask=valid, other=0.0)
        tl.store(slotw_ptr + pos * B + b, w, mask=union)
    tl.store(count_ptr, tl.sum(ui, 0))


@triton.jit
def _keep_one(lg, ao, valid, offs, tau, kk, E_PAD: tl.constexpr, RULE: tl.constexpr):
    """One token's kept experts (bool [E_PAD], expert order, always-on included) from fp32 logits ``lg``.

    Sorting the fp32 probabilities alone gives the exact count (equal probabilities add equal mass, whatever
    their order) and the smallest kept probability p*; experts above p* are kept, and of those equal to p*
    the lowest indices fill the remaining places (the rule's tie order)."""
    cand = valid & (ao == 0)
    sel = tl.where(cand, lg, float("-inf"))
    mx = tl.max(sel, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    ex = tl.where(cand, tl.exp(sel - mx), 0.0)
    p = ex / tl.maximum(tl.sum(ex, 0), 1e-30)
    pk = tl.where(cand, p, -1.0)  # non-candidates sort last
    ps = tl.sort(pk, descending=True)
    scand = ps >= 0.0
    cum = tl.cumsum(tl.where(scand, ps, 0.0), 0)
    thr = tl.where(tau > 1.0, float("inf"), tau)
    if RULE == 0:
        keep_s = (cum < thr) | (offs == 0)
    elif RULE == 1:
        keep_s = ((cum - ps) < thr) | (offs == 0)
    elif RULE == 2:
        keep_s = offs < kk
    else:
        keep_s = offs >= 0
    keep_s = keep_s & scand  # a prefix of the rank order
    nsel = tl.sum(keep_s.to(tl.int32), 0)
    p_star = tl.min(tl.where(keep_s, ps, float("inf")), 0)
    above = cand & (pk > p_star)
    tie = cand & (pk == p_star)
    ti = tie.to(tl.int32)
    tie_rank = tl.cumsum(ti, 0) - ti
    keep = above | (tie & (tie_rank < nsel - tl.sum(above.to(tl.int32), 0))) | ao
    return keep


@triton.jit
def _select_one(logits_ptr, keep_ptr, wdense_ptr, ids_ptr, slotw_ptr, count_ptr, ao_ptr, tau_ptr, k_ptr,
                E, gate_offset, E_PAD: tl.constexpr, RULE: tl.constexpr, GATES: tl.constexpr):
    """Batch-1 selection. Sorting the fp32 probabilities alone gives the exact count (equal probabilities add
    equal mass, whatever their order) and the smallest kept probability p*; experts above p* are kept, and
    of those equal to p* the lowest indices fill the remaining places (the rule's tie order). No index
    payload, no scatter: the active ids come out compacted in ascending order."""
    offs = tl.arange(0, E_PAD)
    valid = offs < E
    ao = (tl.load(ao_ptr + offs, mask=valid, other=0) != 0) & valid
    tau = tl.load(tau_ptr)
    kk = tl.load(k_ptr)
    lg = tl.load(logits_ptr + offs, mask=valid, other=0.0)
    keep = _keep_one(lg, ao, valid, offs, tau, kk, E_PAD, RULE)
    if GATES:
        w = tl.sigmoid(lg + gate_offset)
    else:
        w = tl.full([E_PAD], 1.0, tl.float32)
    ki = keep.to(tl.int32)
    pos = tl.cumsum(ki, 0) - ki
    tl.store(ids_ptr + pos, offs, mask=keep)
    tl.store(slotw_ptr + pos, w, mask=keep)
    tl.store(count_ptr, tl.sum(ki, 0))
    # Per-expert statistics in expert order (nothing downstream waits for them).
    tl.store(keep_ptr + offs, ki.to(tl.int8), mask=valid)
    tl.store(wdense_ptr + offs, tl.where(keep, w, 0.0), mask=valid)


@triton.jit
def _route_kernel(x_ptr, wr_ptr, logits_ptr, keep_ptr, wdense_ptr, ids_ptr, slotw_ptr, count_ptr, ao_ptr,
                  tau_ptr, k_ptr, ticket_ptr, zero_ptr, n_zero, B, E, D, gate_offset,
                  BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, E_PAD: tl.constexpr, ZBLOCK: tl.constexpr,
                  RULE: tl.constexpr, GATES: tl.constexpr, SINGLE: tl.constexpr, SELECT: tl.constexpr):
    pid_e = tl.program_id(0)
    b = tl.program_id(1)
    # Clear the expert kernels' split-K accumulator for this step (cheap, spread over all programs).
    lin = b * tl.num_programs(0) + pid_e
    offs_z = lin * ZBLOCK + tl.arange(0, ZBLOCK)
    tl.store(zero_ptr + offs_z, tl.zeros([ZBLOCK], dtype=tl.float32), mask=offs_z < n_zero)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    me = offs_e < E
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < D
        xk = tl.load(x_ptr + b * D + offs_k, mask=mk, other=0.0).to(tl.float32)
        w = tl.load(wr_ptr + offs_e[:, None].to(tl.int64) * D + offs_k[None, :], mask=me[:, None] & mk[None, :],
                    other=0.0)
        acc += tl.sum(w.to(tl.float32) * xk[None, :], axis=1)
    tl.store(logits_ptr + b * E + offs_e, acc, mask=me)
    # Last program in: every logit is written (release/acquire through the ticket), run the selection.
    tl.debug_barrier()
    total = tl.num_programs(0) * tl.num_programs(1)
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if SELECT and ticket == total - 1:
        tl.debug_barrier()
        if SINGLE:
            _select_one(logits_ptr, keep_ptr, wdense_ptr, ids_ptr, slotw_ptr, count_ptr, ao_ptr, tau_ptr, k_ptr,
                        E, gate_offset, E_PAD, RULE, GATES)
        else:
            _select_rows(logits_ptr, keep_ptr, wdense_ptr, ids_ptr, slotw_ptr, count_ptr, ao_ptr, tau_ptr,
                         k_ptr, B, E, gate_offset, E_PAD, RULE, GATES)
        tl.atomic_xchg(ticket_ptr, 0)  # ready for the next launch / graph replay


class Router(DeviceBudget):
    """Preallocated routing buffers for one layer shape and batch size (safe to capture in a CUDA graph).

    ``tau`` and ``k`` are device tensors (numbers get their own, tensors are shared as given): ``set_tau``
    changes them in place without recapture.
    """

    def __init__(self, packed: PackedFFN, batch: int, *, rule: str = "cumulative",
                 tau: float | torch.Tensor = TAU_ALL, k: int | torch.Tensor | None = None, gates: bool = True,
                 gate_offset: float = 0.0, block_e: int | None = None, block_k: int | None = None, num_warps: int = 8,
                 zero: torch.Tensor | None = None) -> None:
        if rule not in RULE_IDS:
            raise PrunePathError(f"unknown routing rule {rule!r}; choose one of {', '.join(RULE_IDS)}")
        dev = packed.device
        e, d = packed.num_experts, packed.hidden_size
        self.packed, self.batch, self.rule, self.gates, self.gate_offset = packed, batch, rule, gates, float(gate_offset)
        f32 = {"dtype": torch.float32, "device": dev}
        self.logits = torch.empty(batch, e, **f32)
        # A float32 buffer the kernel clears on every launch (the expert kernels' split-K accumulator).
        self.zero = zero if zero is not None else torch.zeros(1, **f32)
        self.keep = torch.empty(batch, e, dtype=torch.int8, device=dev)
        self.weights = torch.empty(batch, e, **f32)
        self.ids = torch.zeros(e, dtype=torch.int32, device=dev)
        self.slot_w = torch.zeros(e, batch, **f32)
        self.count = torch.zeros(1, dtype=torch.int32, device=dev)
        self.ticket = torch.zeros(1, dtype=torch.int32, device=dev)
        self.tau, self.k = budget_tensors(tau, k, e, dev)
        self.block_e = block_e or (2 if d >= 2048 else 4)
        self.block_k = block_k or min(next_pow2(d), 4096)
        self.num_warps = num_warps
        self.e_pad = max(16, next_pow2(e))
        self.select = True  # benchmarks switch it off to time the router GEMV alone

    def __call__(self, x: torch.Tensor) -> "Router":
        """Route ``x`` [B, d] (B = this router's batch); results land in ids / slot_w / count / weights."""
        check_kernel_device(x)
        p = self.packed
        e, d = p.num_experts, p.hidden_size
        if x.shape != (self.batch, d) or not x.is_contiguous():
            raise PrunePathError(f"router expects a contiguous [{self.batch}, {d}] input, got {tuple(x.shape)}")
        grid = (triton.cdiv(e, self.block_e), self.batch)
        nz = self.zero.numel() if self.zero.numel() > 1 else 0
        zblock = max(16, next_pow2(triton.cdiv(max(nz, 1), grid[0] * grid[1])))
        _route_kernel[grid](
            x, p.router_w, self.logits, self.keep, self.weights, self.ids, self.slot_w, self.count,
            p.always_on, self.tau, self.k, self.ticket, self.zero, nz, self.batch, e, d, self.gate_offset,
            BLOCK_E=self.block_e, BLOCK_K=self.block_k, E_PAD=self.e_pad, ZBLOCK=zblock, RULE=RULE_IDS[self.rule],
            GATES=self.gates, SINGLE=self.batch == 1, SELECT=self.select, num_warps=self.num_warps)
        return self
