"""A static-cache decode engine whose whole decode step is one CUDA graph.

Supported architectures: Llama / Mistral / Qwen2 / SmolLM (RMSNorm, RoPE, GQA, gated SiLU FFN) and GPT-2
(LayerNorm, learned positions, plain GELU FFN with biases). Each layer is: norm kernel (fp32 residual →
bf16) → fused q|k|v GEMV (cuBLAS) → RoPE + KV-cache write kernel → split-KV decode attention (two kernels)
→ o-proj GEMV (cuBLAS) + residual add → norm kernel → FFN. The FFN is the PrunePath sparse kernels
(routing + fused experts, added straight into the fp32 residual), or dense cuBLAS (the fair baseline, or
the "gated dense" fallback of a converted model). Everything a step needs lives in preallocated buffers, the
position and the next token stay on the device, and τ lives in device tensors: a generation is a prefill
plus one graph replay per token, with no host synchronisation until the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunepath.baselines.activation import activation_modules
from prunepath.errors import PrunePathError
from prunepath.kernels._common import THRESHOLD_OFF as THR_OFF
from prunepath.kernels._common import interpreting
from prunepath.kernels.layout import PackedFFN, detect_activation, pack_ffn
from prunepath.routing.config import TAU_ALL, RoutingConfig
from prunepath.models.adapters import adapter_for
from prunepath.models.arch import DECODE_MODEL_TYPES, decode_view
from prunepath.routing.ffn import is_converted, prunepath_modules
from prunepath.state import state_of

# The Triton kernel modules (kernels.decode_ops / dense / ffn) import triton at their top: they are imported
# inside the functions that build GPU paths, so that the engine's CPU path and importing prunepath never need
# Triton (the documented in-function imports of the package).

SUPPORTED = DECODE_MODEL_TYPES  # one decode weight view per family: prunepath.models.arch

_WARMUP_STREAMS: dict[str, "torch.cuda.Stream"] = {}


def warmup_stream(device: torch.device | str) -> "torch.cuda.Stream":
    """The one side stream per device on which every CUDA-graph warm-up runs. PyTorch keeps a cuBLAS workspace
    (32 MiB on Hopper) per stream a GEMM has run on, for the life of the process, so a fresh stream per capture
    would add that much held memory at every recapture (until the 32-stream pool wraps)."""
    dev = torch.device(device)
    if dev.index is None:  # "cuda" and "cuda:N" of the current device must share one stream
        dev = torch.device(dev.type, torch.cuda.current_device())
    key = str(dev)
    if key not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[key] = torch.cuda.Stream(device=dev)
    return _WARMUP_STREAMS[key]


def _teal_wrappers(model: nn.Module) -> list:
    """TEAL wrappers installed on an unconverted model (CATS has no decode kernel: named error)."""
    wrappers = activation_modules(model)
    if any(w.method != "teal" for w in wrappers):
        raise PrunePathError("the decode engine runs TEAL thresholds, not CATS (CATS reads every gate row first); "
                             "remove them (prunepath.baselines.activation.remove_activation_sparsity) or use the "
                             "PyTorch path (--kernels torch)")
    return wrappers


@dataclass
class _Layer:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor | None
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor | None
    ffn: PackedFFN
    converted: bool
    k_cache: torch.Tensor | None = None
    v_cache: torch.Tensor | None = None
    sparse: object | None = None  # SparseFFN (or ThresholdFFN) for the decode step
    thr: torch.Tensor | None = None  # float32 [2] view (t_in, t_mid) when this layer's FFN runs thresholded
    prefill_ffn: object | None = None  # GatedDense for prefill (any token count)


def _pack_dense(dense, dtype: torch.dtype, device: torch.device) -> PackedFFN:
    """An unconverted FFN as a single 'expert' (the dense baseline runs it through cuBLAS)."""
    d, ff = dense.hidden_size, dense.intermediate_size
    kw = {"dtype": dtype, "device": device}
    if dense.gated:
        w_in = torch.cat([dense.gate_w, dense.up_w], 0).to(**kw).reshape(1, 2 * ff, d)
        b_in = None
        if dense.gate_b is not None or dense.up_b is not None:
            zero = torch.zeros(ff, device=dense.up_w.device)
            b_in = torch.cat([dense.gate_b if dense.gate_b is not None else zero,
                              dense.up_b if dense.up_b is not None else zero]).float().to(device).reshape(1, -1)
    else:
        w_in = dense.up_w.to(**kw).reshape(1, ff, d)
        b_in = dense.up_b.float().to(device).reshape(1, ff) if dense.up_b is not None else None
    w_out = dense.down_w.t().to(**kw).contiguous().reshape(1, ff, d)
    b_out = dense.down_b.float().to(device) if dense.down_b is not None else None
    return PackedFFN(w_in=w_in.contiguous(), b_in=b_in, w_out=w_out, b_out=b_out,
                     router_w=torch.zeros(1, d, **kw), always_on=torch.zeros(1, dtype=torch.int8, device=device),
                     activation=detect_activation(dense.activation), gated=dense.gated)


# FFN bytes per layer below which "auto" runs the dense-equivalent path even at batch 1. On one H200 (batch 1,
# CUDA graphs): SmolLM2-135M's layer (5.3 MB) ran faster dense-equivalent than sparse at every density from 0.1
# to 1.0 (benchmarks/results/ffn-stack-h200-plain-vs-sparse-*.json, 8 to 32 neurons per expert); GPT-2 Medium's
# (16.8 MB) decoded faster sparse at d 0.5 (1.136 ms/token) than dense-equivalent at d 1.0 (1.183), which is that
# path's fastest point (decode-h200-2026-11-29-all-shapes.json); Llama-3-8B's (352 MB) FFN stack ran 1.6-2.3x
# faster sparse at d 0.5-0.3. The bound sits between the two smallest measured sizes. It holds without in-expert
# thresholds only: end to end on SmolLM2 (16-neuron experts, batch 1, benchmarks/results/
# decode-checkpoint-h200-auto-ab.json) the dense-equivalent path was 1.01-1.05x the sparse kernels at τ 0.8-0.95
# without thresholds, but 0.78x with them (τ 0.9, in-expert f 0.3), so thresholded steps keep the sparse kernels.
SPARSE_MIN_BYTES = 8 << 20


class DecodeEngine:
    """Static KV cache + CUDA-graph decode for one model, batch size and maximum length.

    ffn: "auto" (a converted model runs the sparse kernels when the batch is below ``crossover`` and a layer's
    FFN weighs at least ``sparse_min_bytes``, else the dense-equivalent path; dense too when every layer's τ > 1;
    an unconverted model runs dense), "sparse",
    "dense" (converted: one cuBLAS GEMM over w_in and the router, selection + gates in a Triton kernel,
    cuBLAS over w_out; unconverted: the plain dense FFN), "dense_legacy" (router kernel + gated cuBLAS).
    ``crossover``: the smallest batch at which the dense-equivalent path beats the sparse kernels (measured by
    ``benchmarks/ffn_stack.py --crossover``; default 2 = sparse at batch 1 only). ``sparse_min_bytes``: below
    this FFN size per layer the step is launch-bound and skipping experts buys nothing, unless in-expert
    thresholds are set (default :data:`SPARSE_MIN_BYTES` on a GPU, 0 in the CPU interpreter, which times nothing).
    Activation thresholds: where every expert runs unscaled (an ungated checkpoint at τ > 1, or TEAL wrappers on
    an unconverted model) they run the threshold FFN kernels (:mod:`prunepath.kernels.thresholds`) below the
    crossover and the masked dense FFN above it; where the router runs (τ ≤ 1, or gated experts), inside the
    expert kernels and the dense-equivalent path (the router reads the unmasked input). :meth:`set_thresholds`
    changes them without a recapture. The grouped prefill runs the dense-equivalent path in thresholded layers.
    ``prefill``: "dense" (the dense-equivalent path over all prompt tokens) or "grouped" (tokens sorted by
    expert, grouped GEMMs over the selected pairs only). ``graphs=False`` runs the same kernels eagerly (CPU
    interpreter). ``step_hook`` (a callable, or None) runs at the start of every decode step, inside the graph.
    ``plain``: how a decode step runs an FFN that needs no router (a dense model, an ungated checkpoint at τ > 1):
    "fused" (cuBLAS GEMM with fp32 output, one Triton kernel for act(gate)·up, the down GEMM accumulating into
    the fp32 residual; :class:`~prunepath.kernels.dense.GatedDense` with ``router=False``) or "torch" (the
    PyTorch ops of :func:`~prunepath.kernels.ffn.dense_ffn`, kept for A/B timing).
    """

    FFN_MODES = ("auto", "sparse", "dense", "dense_legacy")
    PLAIN_MODES = ("fused", "torch")

    def __init__(self, model: nn.Module, *, batch: int = 1, max_len: int = 1024, ffn: str = "auto",
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 graphs: bool | None = None, ffn_tuning: dict | None = None, crossover: int = 2,
                 prefill: str = "dense", plain: str = "fused", sparse_min_bytes: int | None = None) -> None:
        cfg = model.config
        wrappers = [] if is_converted(model) else _teal_wrappers(model)
        mt = getattr(cfg, "model_type", None)
        if mt not in SUPPORTED:
            raise PrunePathError(f"the decode engine supports {', '.join(SUPPORTED)} models, not {mt!r}; "
                                 "use the PyTorch path (--kernels torch)")
        if ffn not in self.FFN_MODES:
            raise PrunePathError(f"ffn must be one of {', '.join(self.FFN_MODES)} (got {ffn!r})")
        if prefill not in ("dense", "grouped"):
            raise PrunePathError(f"prefill must be 'dense' or 'grouped' (got {prefill!r})")
        if plain not in self.PLAIN_MODES:
            raise PrunePathError(f"plain must be one of {', '.join(self.PLAIN_MODES)} (got {plain!r})")
        self.crossover, self.prefill_mode, self.plain = int(crossover), prefill, plain
        self.step_hook = None
        ref = next(model.parameters())
        self.device = torch.device(device) if device is not None else ref.device
        if self.device.type != "cuda" and not interpreting():
            raise PrunePathError("the Triton decode engine needs a CUDA GPU: use --device cuda, or set "
                                 "TRITON_INTERPRET=1 to run its kernels on the CPU (slow), or --kernels torch")
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.graphs = (self.device.type == "cuda") if graphs is None else graphs
        if sparse_min_bytes is None:
            sparse_min_bytes = SPARSE_MIN_BYTES if self.device.type == "cuda" else 0
        if sparse_min_bytes < 0:
            raise PrunePathError(f"sparse_min_bytes must be >= 0 (got {sparse_min_bytes})")
        self.sparse_min_bytes = int(sparse_min_bytes)
        self.model_type, self.batch, self.max_len = mt, batch, max_len
        self.converted = is_converted(model)
        # The engine's own copy of the routing settings: set_tau changes the engine, never the model's config.
        self.routing: RoutingConfig = state_of(model).config.routing.copy() if self.converted else RoutingConfig()
        kw = {"dtype": self.dtype, "device": self.device}
        self.ffn_tuning = dict(ffn_tuning or {})

        def t(x: torch.Tensor | None, dt: torch.dtype | None = None) -> torch.Tensor | None:
            if x is None:
                return None
            return x.detach().to(dtype=dt or self.dtype, device=self.device).contiguous()

        view = decode_view(model, max_len)  # the architecture's facts: prunepath.models.arch.<family>
        self.rms, self.eps = view.rms, view.eps
        self.heads, self.kv_heads, self.head_dim = view.heads, view.kv_heads, view.head_dim
        self.embed = t(view.embed)
        self.wpe = t(view.wpe, torch.float32)
        self.final_w, self.final_b = t(view.final_w, torch.float32), t(view.final_b, torch.float32)
        self.lm_head = t(view.lm_head)
        self.cos, self.sin = t(view.cos, torch.float32), t(view.sin, torch.float32)
        self.hidden = self.embed.shape[1]
        adapter = adapter_for(model)
        sites = adapter.sites(model)
        pp = {m.layer_index: m for m in prunepath_modules(model)} if self.converted else {}
        self.layers: list[_Layer] = []
        for i, lv in enumerate(view.layers):
            if self.converted:
                packed = pack_ffn(pp[i], dtype=self.dtype, device=self.device)
            else:
                dense = wrappers[i].dense_ffn() if wrappers else adapter.extract(sites[i])
                packed = _pack_dense(dense, self.dtype, self.device)
            layer = _Layer(ln1_w=t(lv.ln1_w, torch.float32), ln1_b=t(lv.ln1_b, torch.float32), qkv_w=t(lv.qkv_w),
                           qkv_b=t(lv.qkv_b), o_w=t(lv.o_w), o_b=t(lv.o_b), ln2_w=t(lv.ln2_w, torch.float32),
                           ln2_b=t(lv.ln2_b, torch.float32), ffn=packed, converted=self.converted)
            layer.k_cache = torch.zeros(batch, self.kv_heads, max_len, self.head_dim, **kw)
            layer.v_cache = torch.zeros(batch, self.kv_heads, max_len, self.head_dim, **kw)
            self.layers.append(layer)
        # τ and k of every layer in one per-model device tensor each: every layer's FFN kernels (decode and
        # prefill) read a view of their entry, so set_tau is one write and a captured graph follows it.
        n = len(self.layers)
        self.budget_tau = torch.full((n,), TAU_ALL, dtype=torch.float32, device=self.device)
        self.budget_k = torch.tensor([lay.ffn.num_experts for lay in self.layers] if self.converted else [0] * n,
                              dtype=torch.int32, device=self.device)
        # activation thresholds (t_in, t_mid) of every layer, likewise one per-model device tensor
        self.budget_thr = torch.full((n, 2), THR_OFF, dtype=torch.float32, device=self.device)
        if self.converted:
            self._thr_values = [self.routing.inner_for(i) for i in range(n)]
        else:
            self._thr_values = [(w.t_in, w.t_mid) for w in wrappers] or [(None, None)] * n
        from prunepath.kernels.decode_ops import DecodeAttention
        self.attn = DecodeAttention(batch, self.heads, self.kv_heads, self.head_dim, max_len, self.device)
        # Step state (device): current token, its position, the step counter, outputs.
        self.tok = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.step_idx = torch.zeros(1, dtype=torch.long, device=self.device)
        self.out_tokens = torch.zeros(batch, max_len, dtype=torch.long, device=self.device)
        self.temperature = torch.ones(1, dtype=torch.float32, device=self.device)
        self.res = torch.zeros(batch, self.hidden, dtype=torch.float32, device=self.device)
        self.xbuf = torch.zeros(batch, self.hidden, **kw)
        self.q = torch.zeros(batch, self.heads, self.head_dim, **kw)
        self.attn_out = torch.zeros(batch, self.heads, self.head_dim, **kw)
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self.ffn_mode = ""
        self._sig: tuple = ()
        self.set_ffn_mode(ffn)

    # ---- configuration ----------------------------------------------------------------------------------
    def resolve_mode(self, ffn: str = "auto") -> str:
        r = self.routing
        if ffn != "auto":
            return ffn
        all_dense = all(r.every_expert(i) for i in range(len(self.layers)))
        # Batch > 1 runs the union of the tokens' experts, which loses to the dense-equivalent path from the
        # measured crossover batch on (docs/decode.md).
        small = self.layers[0].ffn.nbytes() < self.sparse_min_bytes and not any(self._thresholded())
        return "sparse" if self.converted and not all_dense and self.batch < self.crossover and not small else "dense"

    def _signature(self, mode: str) -> tuple:
        r = self.routing
        return (mode, r.rule, r.gates, r.gate_offset, r.method, self._plain_layers(mode), self._thresholded())

    def _thresholded(self) -> tuple[bool, ...]:
        """Per layer, whether activation thresholds are set (its FFN then runs the threshold path)."""
        return tuple(t_in is not None or t_mid is not None for t_in, t_mid in self._thr_values)

    def _plain_layers(self, mode: str) -> tuple[bool, ...]:
        """Per layer, whether the dense path runs the plain FFN: every expert runs unscaled (ungated experts,
        τ > 1 or rule "all"), so the router is not read at all."""
        r = self.routing
        return tuple(self.converted and mode == "dense" and not r.router_needed(i) for i in range(len(self.layers)))

    def sync_routing(self, routing: RoutingConfig | None = None, ffn: str = "auto") -> None:
        """Adopt a copy of ``routing``: a new τ / k only rewrites device tensors (no recapture); a new rule, gate
        setting or FFN path rebuilds the layer FFNs (the next step recaptures)."""
        if routing is not None:
            new = routing.copy()
            new.validate()
            self.routing = new
            self._thr_values = [self.routing.inner_for(i) for i in range(len(self.layers))]
        self._refresh(ffn)

    def _refresh(self, ffn: str) -> None:
        """After the settings changed: rebuild the layer FFNs when their path changes (τ crossing 1 with ungated
        experts, "auto" choosing another path, a layer's thresholds turning on or off), else rewrite τ, k and
        the thresholds in place (no recapture)."""
        if self._signature(self.resolve_mode(ffn)) != self._sig:
            self.set_ffn_mode(ffn)
        else:
            self._write_budget()
            self._write_thresholds()

    def set_ffn_mode(self, ffn: str = "auto") -> None:
        """Choose the FFN path (see the class docstring); rebuilds the per-layer FFN objects and drops graphs."""
        from prunepath.kernels.ffn import SparseFFN
        r = self.routing
        if ffn not in self.FFN_MODES:
            raise PrunePathError(f"ffn must be one of {', '.join(self.FFN_MODES)} (got {ffn!r})")
        requested, ffn = ffn, self.resolve_mode(ffn)
        if ffn == "dense_legacy" and not self.converted:
            ffn = "dense"
        if ffn == "sparse" and not self.converted:
            raise PrunePathError("ffn='sparse' needs a converted model (prunepath.moefy or a PrunePath checkpoint)")
        thresholded = self._thresholded()
        from prunepath.kernels.dense import GatedDense
        if r.method != "prunepath" and self.converted:
            raise PrunePathError(f"the decode kernels implement the prunepath routing method, not {r.method!r}; "
                                 "use the PyTorch path (--kernels torch)")
        self._graphs.clear()  # drop the old graphs (and their memory pools) before building new FFN objects
        self._write_budget(reset_k=True)  # new FFN objects start from the current settings, as new tensors would
        self._write_thresholds()
        plain = self._plain_layers(ffn)
        for i, layer in enumerate(self.layers):
            budget = (self.budget_tau[i:i + 1], self.budget_k[i:i + 1])
            routed = self.converted and not plain[i]  # else the step and prefill run the plain dense FFN
            layer.sparse = None
            layer.thr = self.budget_thr[i] if thresholded[i] else None
            if routed:  # the expert kernels (or the dense-equivalent path), in-expert thresholds inside them
                layer.sparse = SparseFFN(layer.ffn, self.batch, r, mode=ffn, budget=budget, thresholds=layer.thr,
                                         **self.ffn_tuning)
            elif layer.thr is not None and self.batch < self.crossover:
                from prunepath.kernels.thresholds import ThresholdFFN
                layer.sparse = ThresholdFFN(layer.ffn, self.batch, layer.thr)
            elif self.plain == "fused":  # no router: the plain FFN (masked where thresholds are set) in 3 kernels
                layer.sparse = GatedDense(layer.ffn, router=False, thresholds=layer.thr)
            layer.prefill_ffn = (GatedDense(layer.ffn, rule=r.rule, tau=budget[0], k=budget[1], gates=r.gates,
                                            gate_offset=r.gate_offset, thresholds=layer.thr) if routed else None)
        self.ffn_mode, self._ffn_request = ffn, requested
        self._sig = self._signature(ffn)
        self._graphs.clear()

    def set_tau(self, tau: float | None = None, layer_tau: dict[int, float] | None = None, k: int | None = None) -> None:
        """Change τ between generations: the routers read τ from device tensors, so no recapture, unless the
        FFN path changes with it (ungated experts crossing τ = 1, or "auto" choosing another path)."""
        new = self.routing.copy()
        if tau is not None:
            new.tau = float(tau)
        if layer_tau is not None:
            new.layer_tau = {int(i): float(v) for i, v in layer_tau.items()}
        if k is not None:
            new.k = int(k)
        new.validate()
        self.routing = new
        self._refresh(self._ffn_request)

    def set_thresholds(self, t_in: list[float | None], t_mid: list[float | None]) -> None:
        """New activation thresholds per layer (None: no masking there), e.g. TEAL at another target s_FFN, or a
        converted model's in-expert thresholds: rewritten in place, rebuilt only where a layer turns on or off."""
        n = len(self.layers)
        if len(t_in) != n or len(t_mid) != n:
            raise PrunePathError(f"set_thresholds needs {n} t_in and {n} t_mid values (one per layer, None = off), "
                                 f"got {len(t_in)} and {len(t_mid)}")
        vals = [(None if a is None else float(a), None if b is None else float(b)) for a, b in zip(t_in, t_mid)]
        if any(v is not None and v < 0 for pair in vals for v in pair):
            raise PrunePathError("activation thresholds must be >= 0 (None = no masking)")
        if self.converted:
            new = self.routing.copy()
            new.inner = {**new.inner, "t_in": [a for a, _ in vals], "t_mid": [b for _, b in vals]}
            self.routing = new
        self._thr_values = vals
        self._refresh(self._ffn_request)

    def _write_thresholds(self) -> None:
        self.budget_thr.copy_(torch.tensor([[THR_OFF if t is None else t for t in pair] for pair in self._thr_values],
                                           dtype=torch.float32))

    def _write_budget(self, reset_k: bool = False) -> None:
        """τ (and k) of every layer into the per-model tensors, in place. k None keeps the current k, or
        (``reset_k``, for freshly built FFN objects) means every expert."""
        r = self.routing
        self.budget_tau.copy_(torch.tensor([r.tau_for(i) for i in range(len(self.layers))], dtype=torch.float32))
        if r.k is not None:
            self.budget_k.fill_(int(r.k))
        elif reset_k and self.converted:
            self.budget_k.copy_(torch.tensor([lay.ffn.num_experts for lay in self.layers], dtype=torch.int32))

    # ---- the step ---------------------------------------------------------------------------------------
    def _norm(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        from prunepath.kernels.decode_ops import norm
        return norm(x, w, b, self.eps, rms=self.rms, out=out)

    @staticmethod
    def _plain_ffn(layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        """Every expert unscaled through cuBLAS, with the layer's activation thresholds (device tensors) if set."""
        from prunepath.kernels.ffn import dense_ffn
        return dense_ffn(x, layer.ffn, thresholds=layer.thr)

    def _decode_step(self, sample: bool) -> None:
        from prunepath.kernels.decode_ops import rope_and_cache
        b, hd = self.batch, self.head_dim
        res = self.res
        if self.step_hook is not None:
            self.step_hook()
        emb = self.embed.index_select(0, self.tok).float()
        if self.wpe is not None:
            emb = emb + self.wpe.index_select(0, self.pos.long())
        res.copy_(emb)
        for layer in self.layers:
            x = self._norm(res, layer.ln1_w, layer.ln1_b, self.xbuf)
            qkv = torch.nn.functional.linear(x, layer.qkv_w, layer.qkv_b)
            rope_and_cache(qkv, self.cos, self.sin, self.pos, self.q, layer.k_cache, layer.v_cache,
                           self.heads, self.kv_heads)
            self.attn(self.q, layer.k_cache, layer.v_cache, self.pos, self.attn_out)
            res += torch.nn.functional.linear(self.attn_out.view(b, self.heads * hd), layer.o_w, layer.o_b)
            x = self._norm(res, layer.ln2_w, layer.ln2_b, self.xbuf)
            if layer.sparse is not None:
                layer.sparse(x, res)
            else:
                res += self._plain_ffn(layer, x).float()
        x = self._norm(res, self.final_w, self.final_b, self.xbuf)
        logits = torch.nn.functional.linear(x, self.lm_head).float()
        if sample:
            u = torch.rand_like(logits).clamp_(1e-10, 1.0)
            nxt = torch.argmax(logits / self.temperature - torch.log(-torch.log(u)), dim=-1)
        else:
            nxt = torch.argmax(logits, dim=-1)
        self.out_tokens.index_copy_(1, self.step_idx, nxt[:, None])
        self.tok.copy_(nxt)
        self.pos += 1
        self.step_idx += 1

    def _graph(self, sample: bool):
        if not self.graphs:
            return None
        g = self._graphs.get(sample)
        if g is None:
            # Warm up (compiles the kernels) on a side stream, then capture; restore the state it advanced.
            saved = (self.tok.clone(), self.pos.clone(), self.step_idx.clone())
            caches = [(l.k_cache, l.v_cache) for l in self.layers]
            s = warmup_stream(self.device)
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                self._decode_step(sample)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self._decode_step(sample)
            self.tok.copy_(saved[0])
            self.pos.copy_(saved[1])
            self.step_idx.copy_(saved[2])
            del caches  # the warm-up wrote one cache slot at pos, which the real step overwrites
            self._graphs[sample] = g
        return g

    def step(self, sample: bool = False) -> None:
        g = self._graph(sample)
        if g is not None:
            g.replay()
        else:
            self._decode_step(sample)

    # ---- prefill ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt [B, T] through the model (eager, batched), fill the caches; returns last logits [B, V].

        The FFN of a converted model runs the dense-equivalent path (``prefill="dense"``: one GEMM over w_in and
        the router rows, selection + gates in a Triton kernel, a GEMM over w_out: the dense time plus the router
        rows) or the grouped path (``prefill="grouped"``: only the selected (token, expert) pairs).
        """
        from prunepath.kernels.dense import _linear_f32, grouped_ffn
        b, t = input_ids.shape
        if b != self.batch:
            raise PrunePathError(f"this engine was built for batch {self.batch}, got {b} prompts")
        if t >= self.max_len:
            raise PrunePathError(f"prompt of {t} tokens does not fit max_len {self.max_len}")
        ids = input_ids.to(self.device)
        h = self.embed[ids].float()
        if self.wpe is not None:
            h = h + self.wpe[:t]
        h = h.reshape(b * t, -1)
        hd, nh, nkv = self.head_dim, self.heads, self.kv_heads
        for i, layer in enumerate(self.layers):
            x = self._norm(h, layer.ln1_w, layer.ln1_b, torch.empty(b * t, self.hidden, dtype=self.dtype,
                                                                      device=self.device))
            qkv = torch.nn.functional.linear(x, layer.qkv_w, layer.qkv_b).view(b, t, nh + 2 * nkv, hd)
            q, k, v = qkv[:, :, :nh], qkv[:, :, nh:nh + nkv], qkv[:, :, nh + nkv:]
            if self.cos is not None:
                cos, sin = self.cos[:t, None, :], self.sin[:t, None, :]

                def rot(z: torch.Tensor) -> torch.Tensor:
                    z1, z2 = z[..., : hd // 2], z[..., hd // 2:]
                    return (z.float() * cos + torch.cat([-z2, z1], -1).float() * sin).to(z.dtype)
                q, k = rot(q), rot(k)
            layer.k_cache[:, :, :t] = k.transpose(1, 2)
            layer.v_cache[:, :, :t] = v.transpose(1, 2)
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=nkv != nh)
            h = h + torch.nn.functional.linear(o.transpose(1, 2).reshape(b * t, nh * hd), layer.o_w, layer.o_b).float()
            x = self._norm(h, layer.ln2_w, layer.ln2_b, torch.empty(b * t, self.hidden, dtype=self.dtype,
                                                                      device=self.device))
            if layer.prefill_ffn is None:  # unconverted, or every expert unscaled: the plain FFN
                h = h + self._plain_ffn(layer, x).float()
            elif self.prefill_mode == "grouped" and layer.thr is None:  # (thresholds: the dense-equivalent path)
                weights = layer.prefill_ffn.select(_linear_f32(x, layer.ffn.router_w))
                h = h + grouped_ffn(x, layer.ffn, weights).float()
            else:
                layer.prefill_ffn(x, h)
        last = h.view(b, t, -1)[:, -1].contiguous()
        x = self._norm(last, self.final_w, self.final_b, torch.empty(b, self.hidden, dtype=self.dtype, device=self.device))
        return torch.nn.functional.linear(x, self.lm_head).float()

    # ---- generation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 eos_token_id: int | None = None, check_every: int = 16,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation: new tokens [B, ≤ max_new_tokens]."""
        t = input_ids.shape[1]
        if t + max_new_tokens > self.max_len:
            raise PrunePathError(f"prompt ({t}) + max_new_tokens ({max_new_tokens}) exceeds max_len {self.max_len}")
        if temperature < 0:
            raise PrunePathError("temperature must be >= 0 (0 = greedy)")
        logits = self.prefill(input_ids)
        sample = temperature > 0
        if sample:
            self.temperature.fill_(float(temperature))
            g = torch.empty_like(logits).exponential_(generator=generator) if generator is not None else \
                torch.empty_like(logits).exponential_()
            first = torch.argmax(logits / temperature - torch.log(g), -1)  # Gumbel-max = categorical sampling
        else:
            first = torch.argmax(logits, -1)
        self.out_tokens[:, 0] = first
        self.tok.copy_(first)
        self.pos.fill_(t)
        self.step_idx.fill_(1)
        done = 1
        while done < max_new_tokens:
            n = min(check_every, max_new_tokens - done)
            for _ in range(n):
                self.step(sample)
            done += n
            if eos_token_id is not None and bool((self.out_tokens[:, :done] == eos_token_id).any(-1).all()):
                break
        return self.out_tokens[:, :done].clone()
