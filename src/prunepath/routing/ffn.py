"""The PrunePath FFN: an FFN whose neurons are grouped into contiguous experts, plus a softmax router.

Pure PyTorch (CPU and GPU, any leading shape, fp32/bf16). It computes every expert densely and masks, as the
authors' training code does; the sparse decode kernels live in ``prunepath.kernels``.
"""

from __future__ import annotations

import torch
from torch import nn

from prunepath.routing.config import RoutingConfig
from prunepath.routing.methods import get_method
from prunepath.routing.routers import make_router
from prunepath.state import state_of


def output_shares(norms: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Each expert's share of the true FFN output per token, softmax(log ‖FFN_e(x)‖ / temperature) over the last
    dimension: the target a router is fitted to (warm start) and kept on (router distillation)."""
    return torch.softmax(norms.clamp_min(1e-12).log() / temperature, -1)


class PrunePathFFN(nn.Module):
    """y = Σ_{e ∈ A(x)} g_e(x) · FFN_e(x) (+ shared output bias).

    Gated FFNs: FFN(x) = (act(x W_gate) ⊙ x W_up) W_down; plain FFNs: act(x W_up + b_up) W_down + b_down.
    Expert e owns intermediate neurons [e·n, (e+1)·n). ``neuron_index`` maps each position back to the
    neuron of the original dense FFN.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        neurons_per_expert: int,
        *,
        gated: bool,
        activation: nn.Module,
        bias_in: bool = False,
        bias_out: bool = False,
        dropout: nn.Module | None = None,
        layer_index: int = 0,
        routing: RoutingConfig | None = None,
        router: str = "linear",
        router_kwargs: dict | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        d_ff = num_experts * neurons_per_expert
        kw = {"dtype": dtype, "device": device}
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.neurons_per_expert = neurons_per_expert
        self.gated = gated
        self.layer_index = layer_index
        self.gate_proj = nn.Linear(hidden_size, d_ff, bias=bias_in, **kw) if gated else None
        self.up_proj = nn.Linear(hidden_size, d_ff, bias=bias_in, **kw)
        self.down_proj = nn.Linear(d_ff, hidden_size, bias=bias_out, **kw)
        self.act_fn = activation
        self.dropout = dropout if dropout is not None else nn.Identity()
        self.router = make_router(router, hidden_size, num_experts, **kw, **(router_kwargs or {}))
        self.register_buffer("neuron_index", torch.arange(d_ff, device=device), persistent=True)
        self.register_buffer("always_on", torch.zeros(num_experts, dtype=torch.bool, device=device), persistent=True)
        self.routing = routing if routing is not None else RoutingConfig()
        # Statistics of the last forward (detached); see prunepath.stats.
        self.last_active: torch.Tensor | None = None
        # Set by trainers that need the router logits with their graph (entropy / balance losses).
        self.capture_router_logits = False
        # training with router_distill: the softmax temperature of the norm-share target (None: not captured)
        self.capture_norm_target: float | None = None
        self.last_norm_target: torch.Tensor | None = None
        self.last_router_logits: torch.Tensor | None = None
        # training with inner_sparsity_max: this step's in-expert fraction, f or (f_in, f_mid); thresholds come
        # from the batch
        self.inner_fraction: float | tuple[float, float] | None = None
        # per token, fractions of the input-side and down weights read, when in-expert thresholds were on (else None)
        self.last_inner_kept: torch.Tensor | None = None

    @property
    def intermediate_size(self) -> int:
        return self.num_experts * self.neurons_per_expert

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}x{self.neurons_per_expert}, gated={self.gated}, "
                f"layer={self.layer_index}")

    # ---- routing -------------------------------------------------------------------------------------------
    def expert_weights(self, x: torch.Tensor, scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-expert output scale (0 for dropped experts, float32) and the boolean active mask."""
        if scores is None:
            scores = self.router(x)
        return get_method(self.routing.method)(scores, self.routing, self.layer_index, self.always_on)

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        """Dense intermediate activations (before expert scaling), expert-contiguous."""
        if self.gated:
            return self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        return self.act_fn(self.up_proj(x))

    def expert_output_norms(self, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """‖FFN_e(x)‖₂ of every expert's ungated contribution to the output (output bias excluded), float32,
        shape [..., E]. Chunked over tokens so the [tokens, E, d] intermediate stays small."""
        flat = x.reshape(-1, x.shape[-1])
        out = [self._norms_of_intermediate(self.intermediate(part)) for part in flat.split(chunk)]
        return torch.cat(out).view(*x.shape[:-1], self.num_experts)

    def _norms_of_intermediate(self, h: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """[tokens, E] ‖h_e W_down,e‖₂ from ungated intermediate activations h [..., E·n] (float32).

        Computed as sqrt(h_eᵀ G_e h_e) with the expert's n × n Gram matrix G_e = W_down,eᵀ W_down,e: n² products
        per token and expert instead of n·d, and no [tokens, E, d] intermediate (the router-distillation target
        is built every training step in every layer)."""
        e, n = self.num_experts, self.neurons_per_expert
        w = self.down_proj.weight.float().view(-1, e, n)  # [hidden, E, n]
        gram = torch.einsum("den,dem->enm", w, w)
        flat = h.reshape(-1, e, n)
        out = []
        for part in flat.split(chunk):
            p = part.float()
            # rounding can leave a tiny negative square where an expert's output is ~0
            out.append((torch.einsum("ten,enm->tem", p, gram) * p).sum(-1).clamp_min(0).sqrt())
        return torch.cat(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in-expert thresholds: this batch's quantiles while training with inner_fraction, else the calibrated ones
        batch = self.inner_fraction if self.training else None
        if batch:
            return self.thresholded_forward(x, *_fraction_pair(batch), batch=True)
        return self.thresholded_forward(x, *self.routing.inner_for(self.layer_index))

    def thresholded_forward(self, x: torch.Tensor, t_in, t_mid, *, batch: bool = False) -> torch.Tensor:
        """The FFN with in-expert thresholds ``t_in`` on |x| and ``t_mid`` on |h| (None: no masking there); with
        ``batch`` they are fractions of this batch's entries instead (training), the thresholds their quantiles."""
        r = self.routing
        drop_x = drop_h = None
        if batch:
            t_in = batch_quantile(x, t_in) if t_in else None
        if t_in is not None:
            drop_x = x.abs() <= t_in
            h = self.intermediate(x.masked_fill(drop_x, 0))
        else:
            h = self.intermediate(x)
        if batch:
            t_mid = batch_quantile(h, t_mid) if t_mid else None
        if t_mid is not None:
            drop_h = h.abs() <= t_mid
            h = h.masked_fill(drop_h, 0)
        if self.capture_norm_target is not None:
            with torch.no_grad():  # each expert's share of the true output: what the router should rank by
                c = self._norms_of_intermediate(h.detach()).view(*x.shape[:-1], self.num_experts)
                self.last_norm_target = output_shares(c, self.capture_norm_target)
        needs_router = r.router_needed(self.layer_index) or self.capture_router_logits
        if needs_router:
            logits = self.router(x)
            if self.capture_router_logits:
                self.last_router_logits = logits
            weights, mask = self.expert_weights(x, logits)
            lead = h.shape[:-1]
            h = (h.view(*lead, self.num_experts, self.neurons_per_expert)
                 * weights.to(h.dtype).unsqueeze(-1)).view(*lead, self.intermediate_size)
            self.last_active = mask.sum(-1).detach()
        else:
            mask = None
            self.last_active = torch.full(x.shape[:-1], self.num_experts, device=x.device)
        self.last_inner_kept = None if drop_x is None and drop_h is None else self._kept(drop_x, drop_h, mask, x)
        return self.dropout(self.down_proj(h))

    @torch.no_grad()
    def _kept(self, drop_x, drop_h, mask, x: torch.Tensor) -> torch.Tensor:
        """Per token, the fractions of the input-side weights (gate/up or W_in) and of the down rows it reads
        with in-expert thresholds, shape [..., 2]: an active expert reads the columns of the kept input entries
        and the down rows of its kept intermediate entries (:func:`prunepath.stats.inner_s_per_token` turns them
        into bytes)."""
        lead, e, n = x.shape[:-1], self.num_experts, self.neurons_per_expert
        active = (mask.float() if mask is not None else torch.ones(*lead, e, device=x.device))
        kept_x = 1.0 - drop_x.float().mean(-1) if drop_x is not None else torch.ones(lead, device=x.device)
        if drop_h is not None:
            kept_h = ((~drop_h).view(*lead, e, n).float().sum(-1) * active).sum(-1) / (e * n)
        else:
            kept_h = active.mean(-1)
        return torch.stack([active.mean(-1) * kept_x, kept_h], dim=-1)


def _fraction_pair(f) -> tuple[float, float]:
    """A training step's in-expert fraction as (input fraction, intermediate fraction): one number means both."""
    return (float(f[0]), float(f[1])) if isinstance(f, (tuple, list)) else (float(f), float(f))


def batch_quantile(v: torch.Tensor, fraction: float, samples: int = 1 << 18) -> torch.Tensor:
    """The |v| value (0-d tensor, no host sync) with ``fraction`` of the entries at or below it, estimated on at
    most ``samples`` entries drawn at random: exact quantiles of tens of millions of entries per step cost more
    than they are worth."""
    a = v.detach().reshape(-1)
    if a.numel() > samples:
        a = a[torch.randint(a.numel(), (samples,), device=a.device)]
    k = max(1, min(a.numel(), int(round(fraction * a.numel()))))
    a = a.abs().float()
    return kth_smallest(a, k, by_sort=a.is_cuda).to(v.dtype)


def kth_smallest(a: torch.Tensor, k: int, *, by_sort: bool) -> torch.Tensor:
    """The k-th smallest entry (1-based) of 1-D ``a`` as a 0-d tensor. ``by_sort`` on CUDA, where kthvalue
    selects within one thread block (1.53 against 0.26 ms at 2^18 entries on an H200); kthvalue on the CPU, where
    it is the faster one (about 4 against 23 ms)."""
    return a.sort().values[k - 1] if by_sort else a.kthvalue(k).values


def prunepath_modules(model: nn.Module) -> list[PrunePathFFN]:
    """The model's PrunePath FFNs in layer order."""
    return [m for m in model.modules() if isinstance(m, PrunePathFFN)]


def is_converted(model: nn.Module) -> bool:
    return state_of(model).config is not None
