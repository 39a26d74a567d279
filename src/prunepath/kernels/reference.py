"""Pure-PyTorch references for every decode kernel (the specification the Triton kernels are tested against).

They compute in float32 (or float64 when asked) from the same packed weights, with no compaction tricks:
routing goes through the core routing method (:func:`prunepath.routing.methods.prunepath_method`), so the
kernels are held to the library's one definition of the PrunePath rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunepath.kernels.layout import PackedFFN, _act_reference
from prunepath.routing.config import RoutingConfig
from prunepath.routing.methods import prunepath_method


@dataclass
class Route:
    """A routing decision for a batch of B tokens, compacted to the union of active experts.

    ids: int32 [cap] (first ``count`` valid, ascending expert index); slot_w: float32 [cap, B] gate weight of
    slot s for token b (0 where that token did not select the expert); count: int32 [1];
    weights: float32 [B, E] per-expert weights (0 = inactive); logits: float32 [B, E].
    """

    ids: torch.Tensor
    slot_w: torch.Tensor
    count: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor


def route_reference(x: torch.Tensor, packed: PackedFFN, routing: RoutingConfig, dtype: torch.dtype = torch.float32) -> Route:
    """Router logits → softmax → selection rule → gates, then the union of active experts over the batch."""
    logits = x.to(dtype) @ packed.router_w.to(dtype).t()
    weights, mask = prunepath_method(logits, routing, packed.layer_index, packed.always_on.bool())
    e = packed.num_experts
    union = mask.any(0)
    ids = torch.nonzero(union).flatten().to(torch.int32)
    count = torch.tensor([ids.numel()], dtype=torch.int32, device=x.device)
    full_ids = torch.zeros(e, dtype=torch.int32, device=x.device)
    full_ids[: ids.numel()] = ids
    slot_w = torch.zeros(e, x.shape[0], dtype=torch.float32, device=x.device)
    slot_w[: ids.numel()] = weights.float().t()[ids.long()]
    return Route(full_ids, slot_w, count, weights.float(), mask, logits.float())


def experts_reference(x: torch.Tensor, packed: PackedFFN, ids: torch.Tensor, slot_w: torch.Tensor, count: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y [B, d] = Σ_{s < count} slot_w[s, b] · FFN_{ids[s]}(x_b) + b_out, in ``dtype``."""
    c = int(count.reshape(-1)[0])
    n = packed.neurons_per_expert
    sel = ids[:c].long()
    xw = x.to(dtype)
    w_in = packed.w_in[sel].to(dtype)  # [c, R, d]
    pre = torch.einsum("bd,crd->bcr", xw, w_in)  # [B, c, R]
    if packed.b_in is not None:
        pre = pre + packed.b_in[sel].to(dtype)
    if packed.gated:
        h = _act_reference(packed.activation, pre[..., :n]) * pre[..., n:]
    else:
        h = _act_reference(packed.activation, pre)
    h = h * slot_w[:c].t().to(dtype).unsqueeze(-1)  # [B, c, n]
    y = torch.einsum("bcn,cnd->bd", h, packed.w_out[sel].to(dtype))
    if packed.b_out is not None:
        y = y + packed.b_out.to(dtype)
    return y


def _masked_ffn(x: torch.Tensor, packed: PackedFFN, t_in, t_mid, dtype: torch.dtype,
                weights: torch.Tensor | None = None, round_to: torch.dtype | None = None) -> torch.Tensor:
    """y [B, d] over every expert: x with |x| ≤ t_in zeroed, h (rounded to ``round_to`` when given) with
    |h| ≤ t_mid zeroed, then scaled by the per-expert ``weights`` [B, E] (None: unscaled), sums in ``dtype``."""
    e, n = packed.num_experts, packed.neurons_per_expert
    w_in, b_in, w_out = packed.dense_weights()
    xw = x.to(dtype)
    if t_in is not None:
        xw = xw.masked_fill(xw.abs() <= t_in, 0)
    pre = xw @ w_in.to(dtype).t()
    if b_in is not None:
        pre = pre + b_in.to(dtype)
    pre = pre.view(x.shape[0], e, -1)
    h = _act_reference(packed.activation, pre[..., :n]) * pre[..., n:] if packed.gated else _act_reference(packed.activation, pre)
    if round_to is not None:
        h = h.to(round_to).to(dtype)
    if t_mid is not None:
        h = h.masked_fill(h.abs() <= t_mid, 0)
    if weights is not None:
        h = h * weights.to(dtype).unsqueeze(-1)
    y = h.reshape(x.shape[0], e * n) @ w_out.to(dtype)
    if packed.b_out is not None:
        y = y + packed.b_out.to(dtype)
    return y


def ffn_reference(x: torch.Tensor, packed: PackedFFN, routing: RoutingConfig, dtype: torch.dtype = torch.float64,
                  t_in: float | None = None, t_mid: float | None = None) -> torch.Tensor:
    """The whole sparse FFN, computed densely over every expert and masked (no compaction): y [B, d]. With
    in-expert thresholds ``t_in`` / ``t_mid`` (None: off) the router reads x; the experts read x with |x| ≤ t_in
    zeroed, and intermediate entries with |h| ≤ t_mid are zeroed before the gate weights (the PyTorch forward's
    rule, :meth:`prunepath.routing.ffn.PrunePathFFN.thresholded_forward`)."""
    logits = x.to(dtype) @ packed.router_w.to(dtype).t()
    weights, _ = prunepath_method(logits, routing, packed.layer_index, packed.always_on.bool())
    return _masked_ffn(x, packed, t_in, t_mid, dtype, weights=weights)


def threshold_ffn_reference(x: torch.Tensor, packed: PackedFFN, t_in: float | None, t_mid: float | None,
                            dtype: torch.dtype | None = torch.float64,
                            round_to: torch.dtype | None = None) -> torch.Tensor:
    """Every expert, unscaled, with activation thresholds: input entries with |x| ≤ t_in and intermediate entries
    with |h| ≤ t_mid zeroed (None: no masking), y [B, d] in ``dtype`` (None: x's dtype, the prefill path).
    ``round_to`` (the model's dtype): the thresholds and h rounded to it first, as the kernels and a PyTorch
    forward in that dtype do, with the sums still in ``dtype``."""
    dtype = dtype or x.dtype

    def rnd(v):
        return v if round_to is None or v is None else torch.as_tensor(v).to(round_to).to(dtype)
    return _masked_ffn(x, packed, rnd(t_in), rnd(t_mid), dtype, round_to=round_to)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, rms: bool,
                      offset: float = 0.0) -> torch.Tensor:
    """RMSNorm (``rms``) or LayerNorm over the last dim in float32; weight is used as (weight + offset)."""
    xf = x.float()
    if rms:
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    else:
        y = torch.nn.functional.layer_norm(xf, (x.shape[-1],), eps=eps)
    y = y * (weight.float() + offset)
    if bias is not None:
        y = y + bias.float()
    return y


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotate-half RoPE of heads x [..., hd] with cos/sin [hd] (or broadcastable), in float32."""
    half = x.shape[-1] // 2
    xf = x.float()
    return xf * cos + torch.cat([-xf[..., half:], xf[..., :half]], -1) * sin


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: int,
                               scale: float) -> torch.Tensor:
    """One query per sequence over the first ``length`` cache positions (GQA). q [B, H, hd]; caches [B, KVH, T, hd]."""
    b, h, hd = q.shape
    kvh = k_cache.shape[1]
    k = k_cache[:, :, :length].float().repeat_interleave(h // kvh, dim=1)
    v = v_cache[:, :, :length].float().repeat_interleave(h // kvh, dim=1)
    s = torch.einsum("bhd,bhtd->bht", q.float(), k) * scale
    return torch.einsum("bht,bhtd->bhd", torch.softmax(s, -1), v)
