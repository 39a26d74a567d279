"""FFN-stack decode benchmark (GPU): PrunePath sparse kernels vs dense cuBLAS, CUDA graphs, random bf16 weights.

Expert granularity on one H200 (every size side by side, cuBLAS baseline in the same process; about a minute):

    python benchmarks/ffn_stack.py --shapes smollm2,llama3-8b --neurons-per-expert 16,32,64 --batches 1 \
        --densities 0.5,0.3,0.1 --modes sparse --rep-ms 100 --out benchmarks/results/ffn-stack-h200-granularity.json

Other uses:

    python benchmarks/ffn_stack.py --shapes llama3-8b --batches 1,8 --densities 1.0,0.5,0.3,0.1 [--sweep]
        [--neurons-per-expert 8,16,32,64] [--crossover 1,2,4,8] [--density-profile PROFILE.json[#i]]
        [--deadline EPOCH_SECONDS]
    python benchmarks/ffn_stack.py --density-profile PROFILE.json[#i] --profile-summary   # CPU, no GPU
    TRITON_INTERPRET=1 python benchmarks/ffn_stack.py --smoke --shapes tiny --neurons-per-expert 8,16,32 \
        --batches 1,8 --densities 0.5,0.1 --modes sparse,dense --out /tmp           # CPU smoke test (interpreter)

Without a CUDA GPU the script stops at once unless ``--smoke`` (tiny shapes, Triton interpreter) is given.
``--neurons-per-expert`` (N, default 32) is a list: each size gets E = d_ff / N experts and its own random
layers; every record carries N, E and the router's bytes per layer (hidden × E × 2, bf16) as a fraction of the
FFN's, and a table per size is printed at the end. ``--out`` is a directory (file ffn-stack-<tag>.json) or a
.json path.

Per layer: router GEMV + selection (one kernel), fused expert kernels (two), accumulating into an fp32 residual.
Density is forced through the router: a near-uniform random router (logit std 0.01) with the paper's cumulative
rule at τ = (k + ½)/E keeps k experts per token, a different random set for each token and layer.
Also checks correctness on the GPU (relative error vs the float32 reference, every output element written).
Modes: "plain" / "plain-1" (the engine's fused no-router FFN over the expert layout / the same weights as one
expert, as an unconverted model is packed; timed at density 1.0 only), "cublas-1" (the PyTorch plain FFN over one
expert), "sparse" (routing + expert kernels), "dense" (GatedDense: one GEMM over w_in + router rows, Triton
selection/gates, GEMM over w_out), "dense_legacy" (the earlier router kernel + gated cuBLAS), "cublas" (plain
dense FFN, the baseline). ``--crossover`` times sparse vs dense at several batch sizes and records the smallest
batch from which dense wins (``crossover`` records). ``--density-profile`` replays a trained model's per-token
active-expert counts (see :func:`profile_counts`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHAPES = {
    # name: hidden, d_ff, layers, gated, activation, bias, heads, kv_heads, vocab
    "llama3-8b": dict(d=4096, ff=14336, layers=32, gated=True, act="silu", bias=False, heads=32, kv=8, vocab=128256),
    "qwen2-7b": dict(d=3584, ff=18944, layers=28, gated=True, act="silu", bias=False, heads=28, kv=4, vocab=152064),
    "gpt2-medium": dict(d=1024, ff=4096, layers=24, gated=False, act="gelu_tanh", bias=True, heads=16, kv=16, vocab=50257),
    "smollm2-135m": dict(d=576, ff=1536, layers=30, gated=True, act="silu", bias=False, heads=9, kv=3, vocab=49152),
}
NEURONS = 32  # default neurons per expert (--neurons-per-expert)
ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m", "llama3": "llama3-8b",
           "llama-3-8b": "llama3-8b", "qwen2": "qwen2-7b", "gpt2": "gpt2-medium"}
# CPU smoke test of the script (TRITON_INTERPRET=1, --smoke): tiny shape, eager "graphs", wall-clock timing.
SHAPES["tiny"] = dict(d=48, ff=96, layers=2, gated=True, act="silu", bias=False, heads=4, kv=2, vocab=64)
SHAPES["tiny-gpt2"] = dict(d=48, ff=96, layers=2, gated=False, act="gelu_tanh", bias=True, heads=4, kv=4, vocab=64)
DEV = "cuda"
TIMING = {"warmup": 25, "rep": 300}  # triton.testing.do_bench, milliseconds (--warmup-ms / --rep-ms)


class _Eager:
    """Stands in for a CUDA graph on the CPU (smoke test): replay() calls the function."""

    def __init__(self, fn):
        self.replay = fn


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (the memory ceiling), median of 20."""
    if DEV != "cuda":
        return 1e11
    import triton.testing as tt
    a = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device=DEV).normal_()
    b = torch.empty_like(a)
    ms = tt.do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    bw = 2 * a.numel() * 2 / (ms * 1e-3)
    del a, b
    return bw


def tau_for(k: int, e: int) -> float:
    return (k + 0.5) / e if k < e else 1.05


def num_experts(shape: dict, neurons: int = NEURONS) -> int:
    if neurons < 1 or shape["ff"] % neurons:
        raise ValueError(f"d_ff {shape['ff']} is not a multiple of {neurons} neurons per expert")
    return shape["ff"] // neurons


def make_layers(shape: dict, device: str | None = None, neurons: int = NEURONS):
    device = device or DEV
    from prunepath.kernels import random_packed_ffn
    e = num_experts(shape, neurons)
    layers = []
    for i in range(shape["layers"]):
        # Router weights N(0, (0.01/√d)²): with x ~ N(0, 1) the logits have std 0.01 (near-uniform routing).
        p = random_packed_ffn(shape["d"], e, neurons, gated=shape["gated"], activation=shape["act"], bias=shape["bias"],
                              dtype=torch.bfloat16, device=device, router_std=0.01)
        p.layer_index = i
        layers.append(p)
    return layers


def graph_of(fn, warm: int = 2):
    if DEV != "cuda":
        fn()
        return _Eager(fn)
    from prunepath.decoding.engine import warmup_stream  # one stream: no new cuBLAS workspace per graph
    s = warmup_stream(torch.cuda.current_device())
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warm):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def bench_graph(g) -> float:
    if DEV != "cuda":
        t0 = time.perf_counter()
        g.replay()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing as tt
    return tt.do_bench(g.replay, warmup=TIMING["warmup"], rep=TIMING["rep"], return_mode="median")


def ffn_bytes(shape: dict, active: float, batch_union: float | None = None, neurons: int = NEURONS) -> float:
    """Bytes the FFN stack must read: active experts' rows (in + out) + router, per token step (bf16)."""
    e = num_experts(shape, neurons)
    r = 2 * neurons if shape["gated"] else neurons
    per_expert = (r + neurons) * shape["d"] * 2
    return shape["layers"] * (active * per_expert + e * shape["d"] * 2)


def granularity(shape: dict, neurons: int, dtype_bytes: int = 2) -> dict:
    """N, E and the router's weight bytes per layer (hidden × E × dtype bytes), also as a fraction of the
    layer's FFN weight bytes (every expert's in + out rows; the router is read on every token, whatever τ)."""
    e = num_experts(shape, neurons)
    router = shape["d"] * e * dtype_bytes
    ffn = (3 if shape["gated"] else 2) * shape["ff"] * shape["d"] * dtype_bytes
    return {"neurons_per_expert": neurons, "num_experts": e, "router_bytes_per_layer": router,
            "ffn_bytes_per_layer": ffn, "router_bytes_frac": router / ffn}


def one_expert(p):
    """The packed layer's weights viewed as a single expert of every neuron (no copy)."""
    import dataclasses
    e, r, d = p.w_in.shape
    b_in = None if p.b_in is None else p.b_in.reshape(1, -1)
    return dataclasses.replace(p, w_in=p.w_in.reshape(1, e * r, d), b_in=b_in, w_out=p.w_out.reshape(1, -1, d),
                               router_w=p.router_w[:1], always_on=p.always_on[:1])


def make_ffn(p, batch: int, routing, mode: str, tuning: dict | None = None):
    """SparseFFN for a benchmark mode: sparse, dense, dense_legacy, dense_bf16 (dense with bf16 GEMM outputs),
    or one of the sweep's partial modes (router, router-gemv, router+in: the sparse objects)."""
    from prunepath.kernels.ffn import SparseFFN
    smode = mode if mode in SparseFFN.MODES else ("dense" if mode == "dense_bf16" else "sparse")
    tun = (tuning or {}) if smode == "sparse" else ({"dense_fp32_logits": False} if mode == "dense_bf16" else {})
    return SparseFFN(p, batch, routing, mode=smode, **tun)


def check_correctness(layers, batch: int, tuning: dict, mode: str = "sparse") -> dict:
    """Relative error vs the float32 reference on fresh inputs; the kernels add into a poisoned output (NaN
    where a kernel must overwrite, so an unwritten element shows as non-finite)."""
    from prunepath.kernels.ffn import SparseFFN
    from prunepath.kernels.reference import ffn_reference, route_reference
    from prunepath.routing.config import RoutingConfig
    p = layers[0]
    e = p.num_experts
    worst, ids_ok = 0.0, True
    if mode in ("plain", "plain-1", "cublas-1"):  # no router: every expert unscaled, against the float32 FFN
        from prunepath.kernels.dense import GatedDense
        from prunepath.kernels.ffn import dense_ffn
        q = p if mode == "plain" else one_expert(p)
        x = torch.randn(batch, p.hidden_size, device=DEV).to(torch.bfloat16)
        poison = torch.randn(batch, p.hidden_size, device=DEV) * 100
        out = poison.clone()
        if mode == "cublas-1":
            out += dense_ffn(x, q).float()
        else:
            GatedDense(q, router=False)(x, out)
        ref = ffn_reference(x, q, RoutingConfig(tau=1.05, gates=False), dtype=torch.float32)
        return {"rel_err_max": float((out - poison - ref).norm() / ref.norm()),
                "routing_matches_reference": bool(torch.isfinite(out).all()), "checked_mode": mode}
    for k in (max(1, e // 10), e // 2, e):
        routing = RoutingConfig(tau=tau_for(k, e))
        ffn = make_ffn(p, batch, routing, mode, tuning)
        if ffn.dense is not None:
            ffn.dense.write_weights = True
        x = torch.randn(batch, p.hidden_size, device=DEV).to(torch.bfloat16)
        poison = torch.randn(batch, p.hidden_size, device=DEV) * 100
        out = poison.clone()
        ffn(x, out)
        _sync()
        ref = ffn_reference(x, p, routing, dtype=torch.float32)
        err = float((out - poison - ref).norm() / ref.norm())
        rr = route_reference(x, p, routing)
        c = int(rr.count)
        if ffn.router is not None:
            ids_ok &= int(ffn.router.count) == c and torch.equal(ffn.router.ids[:c], rr.ids[:c])
        else:  # the dense path's selection, per token; bf16-output logits may flip near-ties (counted)
            agree = float(((ffn.dense.weights != 0) == rr.mask).float().mean())
            ids_ok &= agree > 0.999
        ids_ok &= bool(torch.isfinite(out).all())
        worst = max(worst, err)
    res = {"rel_err_max": worst, "routing_matches_reference": bool(ids_ok), "checked_mode": mode}
    if mode.startswith("dense"):
        from prunepath.kernels.dense import logits_are_fp32
        from prunepath.kernels.dense import _MM_F32
        res["logits_fp32"] = logits_are_fp32(torch.device(DEV))
        res["addmm_fp32_out"] = _MM_F32.get("addmm")
    return res


def run_stack(layers, shape, batch, density, mode="sparse", tuning=None, ktable=None):
    """Time the whole FFN stack (one CUDA graph); returns (ms, mean active experts per layer).

    ``ktable`` (int32 [S, L] on the device): per-step, per-layer expert counts forced through the top-k rule
    (a realistic density profile); the graph copies row ``step`` into the routers' k at its start, and the time
    is the mean over S consecutive replays (every row once)."""
    from prunepath.kernels.ffn import SparseFFN, dense_ffn
    from prunepath.routing.config import RoutingConfig
    e = layers[0].num_experts
    k = max(1, round(density * e))
    d = shape["d"]
    xs = torch.randn(len(layers), batch, d, device=DEV).to(torch.bfloat16)
    outs = torch.zeros(len(layers), batch, d, device=DEV)
    kcur = step = None
    if mode in ("cublas", "cublas-1"):
        # cublas-1: the same weights viewed as one expert, as the engine packs an unconverted model (the
        # timing of the original's layout; the values differ)
        packs = layers if mode == "cublas" else [one_expert(p) for p in layers]

        def fn():
            for i, p in enumerate(packs):
                outs[i] += dense_ffn(xs[i], p).float()
        ffns = None
    elif mode in ("plain", "plain-1"):  # the engine's fused plain FFN (no router), expert layout or one expert
        from prunepath.kernels.dense import GatedDense
        packs = layers if mode == "plain" else [one_expert(p) for p in layers]
        plains = [GatedDense(p, router=False) for p in packs]

        def fn():
            for i, f in enumerate(plains):
                f(xs[i], outs[i])
        ffns = None
    else:
        if ktable is not None:
            routing = RoutingConfig(rule="topk", k=e)
        else:
            routing = RoutingConfig(tau=tau_for(k, e))
        ffns = [make_ffn(p, batch, routing, mode, tuning) for p in layers]
        if ktable is not None:
            kcur = torch.zeros(len(layers), dtype=torch.int32, device=DEV)
            step = torch.zeros(1, dtype=torch.long, device=DEV)
            for i, f in enumerate(ffns):
                f.k_tensor = kcur[i:i + 1]

        def fn():
            if kcur is not None:
                kcur.copy_(ktable.index_select(0, step).view(-1))
                step.add_(1).remainder_(ktable.shape[0])
            for i, f in enumerate(ffns):
                if mode in ("router", "router-gemv"):
                    f.router.select = mode == "router"
                    f.router(xs[i])
                elif mode == "router+in":
                    r = f.router(xs[i])
                    ex = f.experts
                    from prunepath.kernels.experts import _experts_in_kernel
                    p = ex.packed
                    _experts_in_kernel[ex.grid_in](xs[i], p.w_in, r.ids, r.count, ex.acc, batch, d,
                                                   p.w_in.shape[1], R_PAD=ex.r_pad, BLOCK_K=ex.block_k,
                                                   B_PAD=ex.b_pad, USE_DOT=ex.use_dot, DOT_F32=False,
                                                   num_warps=ex.warps_in)
                else:
                    f(xs[i], outs[i])
    g = graph_of(fn)
    if ktable is not None:
        ms = bench_mean(g, ktable.shape[0])
        active = float(ktable.float().mean())
    else:
        ms = bench_graph(g)
        active = float("nan")
        if ffns is not None and ffns[0].router is not None and mode == "sparse":
            g.replay()
            _sync()
            active = float(torch.stack([f.router.count for f in ffns]).float().mean())
        elif ffns is not None:
            active = float(k) if batch == 1 else float(e)
    del g
    return ms, active


def bench_mean(g, n: int, rounds: int = 3) -> float:
    """Mean ms per replay over ``n`` consecutive replays (CUDA events), median of ``rounds``."""
    if DEV != "cuda":
        t0 = time.perf_counter()
        for _ in range(n):
            g.replay()
        return (time.perf_counter() - t0) * 1e3 / n
    for _ in range(3):
        g.replay()
    res = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            g.replay()
        b.record()
        _sync()
        res.append(a.elapsed_time(b) / n)
    return sorted(res)[len(res) // 2]


def load_profile(path: str) -> dict:
    """A density profile: {"model", "tau", "s_ffn", "num_experts", "layers": [{"layer", "counts": {n: tokens}}]}.

    A study file with several profiles ({"profiles": [...], **profiles[0]}) gives its first one; ``PATH#i``
    picks profile ``i`` of ``"profiles"``."""
    file, _, index = path.partition("#")
    prof = json.loads(Path(file).read_text())
    if index:
        many = prof.get("profiles") or []
        if not index.isdigit() or int(index) >= len(many):
            raise SystemExit(f"density profile {path}: no profile {index!r} (the file has {len(many)} under "
                             f"'profiles'; use {file}#0 .. #{max(len(many) - 1, 0)})")
        prof = many[int(index)]
    for key in ("num_experts", "layers"):
        if key not in prof:
            raise SystemExit(f"density profile {path} lacks {key!r} (written by the study driver)")
    if not prof["layers"]:
        raise SystemExit(f"density profile {path} has no layers")
    return prof


def profile_summary(prof: dict) -> dict:
    """Active-expert fraction of a density profile: mean over every (token, layer) (= 1 − s_FFN), its standard
    deviation and 10/50/90 % quantiles over (token, layer), the per-layer means (lowest, highest, their spread)
    and the mean within-layer standard deviation across tokens."""
    ep = int(prof["num_experts"])
    tot = s1 = s2 = 0.0
    pooled: dict[int, float] = {}
    layer_means, layer_sds = {}, []
    for rec in sorted(prof["layers"], key=lambda r: int(r["layer"])):
        cs = {int(n): float(c) for n, c in rec["counts"].items() if float(c) > 0}
        n = sum(cs.values())
        if n <= 0:
            raise SystemExit(f"density profile layer {rec['layer']} has no tokens")
        m = sum(k / ep * c for k, c in cs.items()) / n
        layer_means[int(rec["layer"])] = m
        layer_sds.append((sum((k / ep - m) ** 2 * c for k, c in cs.items()) / n) ** 0.5)
        for k, c in cs.items():
            pooled[k] = pooled.get(k, 0.0) + c
            tot, s1, s2 = tot + c, s1 + k / ep * c, s2 + (k / ep) ** 2 * c
    mean = s1 / tot

    def quantile(q: float) -> float:
        acc = 0.0
        for k in sorted(pooled):
            acc += pooled[k]
            if acc >= q * tot:
                return k / ep
        return max(pooled) / ep

    lm = list(layer_means.values())
    lo, hi = min(layer_means, key=layer_means.get), max(layer_means, key=layer_means.get)
    lmean = sum(lm) / len(lm)
    return {"model": prof.get("model"), "tau": prof.get("tau"), "s_ffn": prof.get("s_ffn"), "num_experts": ep,
            "layers": len(lm), "tokens_per_layer": tot / len(lm), "mean_active": mean,
            "sd_active": max(s2 / tot - mean * mean, 0.0) ** 0.5,
            "q10": quantile(0.1), "q50": quantile(0.5), "q90": quantile(0.9),
            "layer_mean_min": layer_means[lo], "layer_min": lo, "layer_mean_max": layer_means[hi], "layer_max": hi,
            "layer_mean_sd": (sum((x - lmean) ** 2 for x in lm) / len(lm)) ** 0.5,
            "within_layer_sd_mean": sum(layer_sds) / len(layer_sds)}


def profile_counts(prof: dict, num_layers: int, num_experts: int, steps: int = 256, seed: int = 0) -> torch.Tensor:
    """int32 [steps, num_layers]: per-token active counts sampled from the profile's per-layer histograms,
    scaled to ``num_experts`` by fraction (k = round(n / E_profile · E), 1 ≤ k ≤ E). Layer i of the target
    shape uses profile layer ⌊i · L_profile / num_layers⌋."""
    g = torch.Generator().manual_seed(seed)
    ep = int(prof["num_experts"])
    layers = sorted(prof["layers"], key=lambda r: int(r["layer"]))
    out = torch.empty(steps, num_layers, dtype=torch.int32)
    for i in range(num_layers):
        rec = layers[i * len(layers) // num_layers]
        ns = torch.tensor([int(n) for n in rec["counts"]], dtype=torch.float64)
        ws = torch.tensor([float(c) for c in rec["counts"].values()], dtype=torch.float64)
        if float(ws.sum()) <= 0:
            raise SystemExit(f"density profile layer {rec['layer']} has no tokens")
        idx = torch.multinomial(ws, steps, replacement=True, generator=g)
        out[:, i] = (ns[idx] / ep * num_experts).round().clamp(1, num_experts).to(torch.int32)
    return out


def sweep(layers, shape, densities=(0.5, 0.3, 0.1)):
    """Try tile configurations of the expert kernels at batch 1, one knob group at a time; return the best."""
    results = []

    def trial(t):
        ms = [run_stack(layers, shape, 1, dd, tuning=t)[0] for dd in densities]
        results.append((sum(ms), t, ms))
        print("sweep", t, [f"{m:.3f}" for m in ms], flush=True)

    base = dict(block_k=256, warps_in=4, block_d=64, group=4, block_j=32, warps_out=4, programs_per_sm=16)
    for bd, gr, bj, wo in [(64, 4, 32, 4), (128, 4, 32, 4), (128, 4, 32, 8), (256, 2, 32, 8), (128, 8, 32, 8),
                           (256, 4, 32, 8), (64, 8, 32, 4), (128, 2, 32, 4), (256, 1, 32, 4)]:
        trial(dict(base, block_d=bd, group=gr, block_j=bj, warps_out=wo))
    best = dict(min(results, key=lambda r: r[0])[1])
    for pps in (8, 32):
        trial(dict(best, programs_per_sm=pps))
    best = dict(min(results, key=lambda r: r[0])[1])
    for part in ("router-gemv", "router", "router+in"):
        ms = [run_stack(layers, shape, 1, dd, mode=part, tuning=best)[0] for dd in densities]
        print("breakdown", part, [f"{m:.3f}" for m in ms], flush=True)
        results.append((float("inf"), {"breakdown": part, **best}, ms))
    return best, [{"tuning": t, "ms": ms} for _, t, ms in results]


def crossover_of(times: dict[int, tuple[float, float]]) -> int | None:
    """Smallest batch from which the dense path is at least as fast as sparse at every larger measured batch."""
    best = None
    for b in sorted(times, reverse=True):
        sp, dn = times[b]
        if dn <= sp:
            best = b
        else:
            break
    return best


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{what}: expected a comma-separated list of integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise SystemExit(f"{what}: expected positive integers, got {text!r}")
    return vals


def check_device(smoke: bool, shapes: list[str]) -> str:
    """'cuda', or 'cpu' for the smoke test; stops with a clear message when neither can run."""
    if smoke:
        big = [s for s in shapes if not s.startswith("tiny")]
        if big:
            raise SystemExit(f"--smoke runs the tiny shapes only (tiny, tiny-gpt2), not {', '.join(big)}")
        if os.environ.get("TRITON_INTERPRET") != "1":
            if any(m.startswith("prunepath.kernels.") for m in sys.modules):
                raise SystemExit("--smoke runs the kernels in Triton's CPU interpreter: set TRITON_INTERPRET=1 "
                                 "before the kernels are imported (TRITON_INTERPRET=1 python benchmarks/ffn_stack.py "
                                 "--smoke ...)")
            os.environ["TRITON_INTERPRET"] = "1"  # nothing compiled yet: the kernels will load interpreted
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/ffn_stack.py times the Triton kernels on a CUDA GPU and none is visible here. "
                         "On a CPU-only machine run the smoke test instead: TRITON_INTERPRET=1 python "
                         "benchmarks/ffn_stack.py --smoke --shapes tiny (or --profile-summary, which needs no GPU)")
    return "cuda"


def granularity_table(records: list[dict]) -> list[str]:
    """One row per (shape, batch, mode, N): E, router bytes, cuBLAS ms, ms and speed-up at each density."""
    rows = [r for r in records if str(r.get("engine", "")).startswith("ffn-prunepath-")
            and isinstance(r.get("density"), float) and "ffn_ms" in r]
    dens = sorted({r["density"] for r in rows}, reverse=True)
    lines = ["| shape | batch | mode | N | E | router KiB/layer | router / FFN bytes | cuBLAS ms | "
             + " | ".join(f"ms @ {d:g} (× cuBLAS)" for d in dens) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(dens)]
    keys = []
    for r in rows:
        k = (r["shape"], r["batch"], r["engine"], r["neurons_per_expert"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        got = {r["density"]: r for r in rows if (r["shape"], r["batch"], r["engine"], r["neurons_per_expert"]) == k}
        first = next(iter(got.values()))
        cells = [f"{got[d]['ffn_ms']:.3f} ({got[d]['speedup_vs_dense']:.2f}×)" if d in got else "—" for d in dens]
        lines.append(f"| {k[0]} | {k[1]} | {k[2][len('ffn-prunepath-'):]} | {k[3]} | {first['num_experts']} | "
                     f"{first['router_bytes_per_layer'] / 1024:.0f} | {100 * first['router_bytes_frac']:.2f} % | "
                     f"{first['dense_cublas_ms']:.3f} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", "--shape", default="llama3-8b",
                    help=f"comma-separated: {', '.join(SHAPES)} (aliases: {', '.join(ALIASES)})")
    ap.add_argument("--neurons-per-expert", default=str(NEURONS),
                    help="comma-separated expert sizes N (E = d_ff / N), each timed side by side, e.g. 16,32,64")
    ap.add_argument("--batches", "--batch", default="1")
    ap.add_argument("--densities", default="1.0,0.5,0.3,0.1")
    ap.add_argument("--modes", default="sparse,dense,dense_legacy",
                    help="PrunePath paths to time besides cuBLAS (dense_legacy only at density 1.0)")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--crossover", default="", help="batches for the sparse-vs-dense crossover, e.g. 1,2,4,8")
    ap.add_argument("--crossover-densities", default="0.5,0.3,0.1")
    ap.add_argument("--density-profile", default="", help="JSON profile of per-token active experts")
    ap.add_argument("--profile-batches", default="1")
    ap.add_argument("--profile-summary", action="store_true",
                    help="print the --density-profile's active-expert summary as JSON and exit (no GPU)")
    ap.add_argument("--deadline", type=float, default=0.0, help="epoch seconds: skip work that starts after it")
    ap.add_argument("--profile-steps", type=int, default=256)
    ap.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up per timing (ms)")
    ap.add_argument("--rep-ms", type=int, default=300, help="do_bench measuring time per timing (ms)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU smoke test: tiny shapes, kernels in Triton's interpreter (TRITON_INTERPRET=1)")
    ap.add_argument("--tag", default="h200")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"),
                    help="directory (writes ffn-stack-<tag>.json there) or a .json file path")
    args = ap.parse_args(argv)
    if args.profile_summary:
        if not args.density_profile:
            raise SystemExit("--profile-summary needs --density-profile PROFILE.json[#i]")
        print(json.dumps(profile_summary(load_profile(args.density_profile)), indent=1))
        return 0
    names = [ALIASES.get(s.strip().lower(), s.strip()) for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in names if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)} "
                         f"(aliases: {', '.join(ALIASES)})")
    neurons_list = _ints(args.neurons_per_expert, "--neurons-per-expert")
    batches_arg = _ints(args.batches, "--batches")
    global DEV
    DEV = check_device(args.smoke, names)
    TIMING.update(warmup=args.warmup_ms, rep=args.rep_ms)
    gpu = torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu"
    bw = copy_bandwidth()
    print(f"gpu {gpu}  copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    records, sweeps = [], {}
    out = Path(args.out) if args.out.endswith(".json") else Path(args.out) / f"ffn-stack-{args.tag}.json"
    late = (lambda: args.deadline and time.time() > args.deadline)
    modes = [m for m in args.modes.split(",") if m]
    prof = load_profile(args.density_profile) if args.density_profile else None
    base = dict(gpu=gpu, copy_gbps=bw / 1e9, date=time.strftime("%Y-%m-%d"),
                command=" ".join(["python", "benchmarks/ffn_stack.py"] + list(sys.argv[1:] if argv is None else argv)))
    t_start = time.time()

    def save():
        from prunepath.evaluation.reports import atomic_write_text
        atomic_write_text(out, json.dumps({"records": records, "sweeps": sweeps}, indent=1))

    for name in names:
        for n in neurons_list:
            if late():
                print(f"deadline: skipping {name} N={n}", flush=True)
                continue
            shape = SHAPES[name]
            if shape["ff"] % n:
                msg = f"d_ff {shape['ff']} is not a multiple of N = {n}"
                print(f"{name} N={n}: skipped ({msg})", flush=True)
                records.append(dict(base, shape=name, neurons_per_expert=n, engine="skipped", reason=msg))
                continue
            run_size(name, shape, n, args, modes, prof, batches_arg, base, bw, records, sweeps, late, save)
    save()
    print(f"\ntotal {time.time() - t_start:.0f}s; records in {out}")
    print("\n| shape | N | E | batch | density | engine | ffn ms | floor ms | GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        if "ffn_ms" in r:
            print(f"| {r['shape']} | {r.get('neurons_per_expert')} | {r.get('num_experts')} | {r['batch']} | "
                  f"{r['density']} | {r['engine']} | {r['ffn_ms']:.3f} | {r['ffn_floor_ms']:.3f} | "
                  f"{r.get('ffn_gbps', float('nan')):.0f} |")
    checks = [r for r in records if str(r.get("engine", "")).startswith("check-")]
    if checks:
        print(f"\ncorrectness ({DEV} vs the float32 reference):")
        for r in checks:
            print(f"  {r['shape']} N={r['neurons_per_expert']} E={r['num_experts']} b{r['batch']} {r['engine']}: "
                  f"rel_err_max {r['rel_err_max']:.2e} routing_matches_reference {r['routing_matches_reference']}")
    table = granularity_table(records)
    if len(table) > 2:
        print("\nexpert granularity (same densities; speed-up vs dense cuBLAS in the same process):")
        print("\n".join(table))
    return 0


def run_size(name, shape, n, args, modes, prof, batches_arg, base, bw, records, sweeps, late, save):
    """Every measurement of one shape at one expert size N (random layers of E = d_ff / N experts)."""
    t0 = time.time()
    layers = make_layers(shape, neurons=n)
    e = layers[0].num_experts
    gran = granularity(shape, n)
    base = dict(base, **gran)
    print(f"{name} N={n} E={e}: router {gran['router_bytes_per_layer'] / 1024:.0f} KiB/layer "
          f"({100 * gran['router_bytes_frac']:.2f} % of the FFN bytes)", flush=True)
    tuning = {}
    key = name if n == NEURONS else f"{name}/N{n}"
    if args.sweep:
        tuning, sweeps[key] = sweep(layers, shape)
        print("best", tuning, flush=True)
    batches = batches_arg if not prof else []
    for batch in batches:
        if late():
            break
        tb = tuning if batch == 1 else {}
        for m in modes:
            corr = check_correctness(layers, batch, tb, mode=m)
            print(name, f"N={n}", "batch", batch, corr, flush=True)
            records.append(dict(base, shape=name, batch=batch, engine=f"check-{m}", **corr))
        dense_ms, _ = run_stack(layers, shape, batch, 1.0, mode="cublas")
        dense_floor = ffn_bytes(shape, e, neurons=n) / bw * 1e3
        records.append(dict(base, shape=name, batch=batch, density=1.0, engine="ffn-dense-cublas", ffn_ms=dense_ms,
                            ffn_floor_ms=dense_floor, ffn_gbps=ffn_bytes(shape, e, neurons=n) / dense_ms / 1e6))
        for dens in [float(x) for x in args.densities.split(",")]:
            for mode in modes:
                if late():
                    break
                if mode in ("dense_legacy", "dense_bf16", "plain", "plain-1", "cublas-1") and dens < 1.0:
                    continue
                ms, active = run_stack(layers, shape, batch, dens, mode=mode, tuning=tb if mode == "sparse" else {})
                byt = ffn_bytes(shape, active, neurons=n) if mode == "sparse" else ffn_bytes(shape, e, neurons=n)
                floor = ffn_bytes(shape, max(1, round(dens * e)) * 1.0, neurons=n) / bw * 1e3
                rec = dict(base, shape=name, batch=batch, density=dens, engine=f"ffn-prunepath-{mode}", ffn_ms=ms,
                           ffn_floor_ms=floor, union_density=active / e, ffn_gbps=byt / ms / 1e6,
                           dense_cublas_ms=dense_ms, speedup_vs_dense=dense_ms / ms, tuning=tb)
                records.append(rec)
                print(f"{name:13s} N{n:<3d} b{batch} d{dens:.2f} {rec['engine']:26s} {ms:7.3f} ms  floor {floor:6.3f}  "
                      f"dense {dense_ms:6.3f}  union {active / e:.2f}  {rec['ffn_gbps']:6.0f} GB/s", flush=True)
        save()
    if args.crossover and not prof:
        for dens in [float(x) for x in args.crossover_densities.split(",")]:
            times = {}
            for batch in _ints(args.crossover, "--crossover"):
                if late():
                    break
                sp, act = run_stack(layers, shape, batch, dens, mode="sparse", tuning=tuning if batch == 1 else {})
                dn, _ = run_stack(layers, shape, batch, dens, mode="dense")
                times[batch] = (sp, dn)
                records.append(dict(base, shape=name, batch=batch, density=dens, engine="crossover-point",
                                    sparse_ms=sp, dense_ms=dn, union_density=act / e))
                print(f"{name} N={n} crossover d{dens:.2f} b{batch}: sparse {sp:.3f} dense {dn:.3f} "
                      f"union {act / e:.2f}", flush=True)
            records.append(dict(base, shape=name, density=dens, engine="crossover",
                                crossover_batch=crossover_of(times), measured_batches=sorted(times)))
            print(f"{name} N={n} crossover d{dens:.2f}: dense from batch {crossover_of(times)}", flush=True)
            save()
    if prof:
        kt = profile_counts(prof, shape["layers"], e, steps=args.profile_steps).to(DEV)
        label = f"profile:{prof.get('tau')}"
        pdens = float(kt.float().mean()) / e
        for batch in _ints(args.profile_batches, "--profile-batches"):
            if late():
                break
            dense_ms, _ = run_stack(layers, shape, batch, 1.0, mode="cublas")
            for mode in ("sparse", "dense"):
                ms, active = run_stack(layers, shape, batch, pdens, mode=mode, tuning=tuning if batch == 1 else {},
                                       ktable=kt)
                floor = ffn_bytes(shape, active, neurons=n) / bw * 1e3
                rec = dict(base, shape=name, batch=batch, density=label, measured_density=active / e,
                           engine=f"ffn-prunepath-{mode}", ffn_ms=ms, ffn_floor_ms=floor, dense_cublas_ms=dense_ms,
                           speedup_vs_dense=dense_ms / ms, profile_model=prof.get("model"),
                           profile_s_ffn=prof.get("s_ffn"), profile_num_experts=prof.get("num_experts"))
                records.append(rec)
                print(f"{name} N={n} b{batch} {label} (mean density {active / e:.3f}) {mode}: {ms:.3f} ms "
                      f"(cuBLAS {dense_ms:.3f}, floor {floor:.3f})", flush=True)
            save()
    del layers
    torch.cuda.empty_cache() if DEV == "cuda" else None
    save()
    print(f"{name} N={n} done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
