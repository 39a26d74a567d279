"""The whole sparse FFN for decoding: routing kernel + fused expert kernels, with a dense cuBLAS fallback."""

from __future__ import annotations

import torch

from prunepath.errors import PrunePathError
from prunepath.kernels._common import DeviceBudget
from prunepath.kernels.experts import ExpertRunner
from prunepath.kernels.layout import PackedFFN, _act_reference
from prunepath.kernels.route import Router
from prunepath.routing.config import RoutingConfig
from prunepath.kernels.dense import GatedDense, masked_input


# One definition of each activation for every PyTorch path (reference and cuBLAS fallback).
_act = _act_reference


def dense_ffn(x: torch.Tensor, packed: PackedFFN, gate_weights: torch.Tensor | None = None,
              thresholds: torch.Tensor | None = None) -> torch.Tensor:
    """All experts through cuBLAS from the packed layout (no copy): y [B, d] in x's dtype.

    ``gate_weights`` [B, E] scales each expert's activations (PrunePath gates); None = unscaled (dense model).
    ``thresholds``: the float32 [2] device tensor (t_in, t_mid) of :class:`~prunepath.kernels.thresholds.ThresholdFFN`
    (entries with |x| ≤ t_in and |h| ≤ t_mid zeroed, compared in x's dtype; no host read, graph-safe).
    """
    w_in, b_in, w_out = packed.dense_weights()
    e, n = packed.num_experts, packed.neurons_per_expert
    x = masked_input(x, thresholds)
    pre = torch.nn.functional.linear(x, w_in, b_in.to(x.dtype) if b_in is not None else None)
    pre = pre.view(x.shape[0], e, -1)
    h = _act(packed.activation, pre[..., :n]) * pre[..., n:] if packed.gated else _act(packed.activation, pre)
    if thresholds is not None:  # before the gate weights, as the PyTorch forward drops |h| ≤ t_mid
        h = h.masked_fill(h.abs() <= thresholds[1], 0)
    if gate_weights is not None:
        h = h * gate_weights.to(h.dtype).unsqueeze(-1)
    y = h.reshape(x.shape[0], e * n) @ w_out
    if packed.b_out is not None:
        y = y + packed.b_out.to(y.dtype)
    return y


class SparseFFN(DeviceBudget):
    """Decode-time PrunePath FFN for one layer and batch size: ``ffn(x, out)`` adds FFN(x) into ``out``.

    Graph-safe: fixed grids, preallocated buffers, τ in a device tensor (``set_tau``). ``mode``:

    * "sparse": the routing kernel + fused expert kernels (only the selected experts' bytes are read);
    * "dense": :class:`~prunepath.kernels.dense.GatedDense` — one cuBLAS GEMM over w_in and the router rows,
      a Triton kernel for selection + activation + gates, cuBLAS over w_out (every expert read; same result);
    * "dense_legacy": the earlier dense path (routing kernel, then ``dense_ffn`` with the gate weights), kept
      so a benchmark can time old against new.

    ``thresholds``: in-expert thresholds, the float32 [2] device tensor (t_in, t_mid) of
    :func:`~prunepath.kernels.thresholds.thresholds_tensor` (e.g. a view of the engine's per-model tensor), or
    None. The router reads the unmasked input; inside the selected experts, entries with |x| ≤ t_in and |h| ≤ t_mid
    count as 0 (the PyTorch forward's rule at any τ, gated or not), and at batch 1 the sparse path skips the
    W_down rows of the dropped h entries.
    """

    MODES = ("sparse", "dense", "dense_legacy")

    def __init__(self, packed: PackedFFN, batch: int, routing: RoutingConfig | None = None, *,
                 mode: str = "sparse", budget: tuple[torch.Tensor, torch.Tensor] | None = None,
                 thresholds: torch.Tensor | None = None, **tuning) -> None:
        routing = routing or RoutingConfig()
        if routing.method != "prunepath":
            raise PrunePathError(f"the decode kernels implement the prunepath routing method, not "
                                 f"{routing.method!r}; use the PyTorch path (--kernels torch)")
        if mode not in self.MODES:
            raise PrunePathError(f"mode must be one of {', '.join(self.MODES)} (got {mode!r})")
        rt = {k: v for k, v in tuning.items() if k.startswith("router_")}
        ex = {k: v for k, v in tuning.items() if not k.startswith("router_") and not k.startswith("dense_")}
        dn = {k[len("dense_"):]: v for k, v in tuning.items() if k.startswith("dense_")}
        self.packed, self.batch, self.mode, self.thresholds = packed, batch, mode, thresholds
        # budget: (τ, k) views of the engine's per-model tensors; else this layer's own, from ``routing``
        tau, k = budget if budget is not None else (routing.tau_for(packed.layer_index), routing.k)
        self.experts = ExpertRunner(packed, batch, **ex) if mode == "sparse" else None
        self.router = None
        self.dense = None
        if mode == "dense":
            self.dense = GatedDense(packed, rule=routing.rule, tau=tau, k=k, gates=routing.gates,
                                    gate_offset=routing.gate_offset, thresholds=thresholds, **dn)
        else:
            self.router = Router(packed, batch, rule=routing.rule, tau=tau, k=k, gates=routing.gates,
                                 gate_offset=routing.gate_offset,
                                 zero=self.experts.acc if self.experts is not None else None,
                                 **{k[len("router_"):]: v for k, v in rt.items()})

    @property
    def _inner(self) -> DeviceBudget:
        """The object whose tensors the kernels read: the dense path or the router."""
        return self.dense if self.dense is not None else self.router

    @property
    def tau(self) -> torch.Tensor:  # the inherited set_tau / tau_tensor go through these
        return self._inner.tau

    @property
    def k(self) -> torch.Tensor:
        return self._inner.k

    @k.setter
    def k(self, t: torch.Tensor) -> None:
        self._inner.k = t

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return self.dense(x, out)
        r = self.router(x)
        if self.mode == "dense_legacy":
            out += dense_ffn(x, self.packed, r.weights, thresholds=self.thresholds).float()
            return out
        return self.experts.run(x, r.ids, r.slot_w, r.count, out, clear=False, thresholds=self.thresholds)
