"""Activation-threshold FFN decode benchmark (GPU): TEAL-style row skipping vs dense cuBLAS vs expert skipping.

One H200, everything in one process, CUDA graphs over a whole stack of layers (so the weights do not sit in L2):

    python benchmarks/threshold_ffn.py --shapes smollm2,llama3-8b --sparsities 0.3,0.4,0.5,0.6 --engine smollm2 \
        --out benchmarks/results/threshold-ffn-h200.json
    TRITON_INTERPRET=1 python benchmarks/threshold_ffn.py --smoke --out /tmp      # CPU smoke test (interpreter)

Per shape and target s (the fraction of FFN weight bytes a token does not read):

* ``dense``: every layer's plain FFN through cuBLAS (the baseline, the engine's plain path);
* ``threshold``: :class:`prunepath.kernels.thresholds.ThresholdFFN` with per-layer thresholds at the s-quantiles
  of that layer's |x| and |h| (TEAL's uniform split: gated bytes (2·s_in + s_mid)/3 = s), one graph per block
  tuning, the thresholds rewritten in place between sparsities (the graph follows them);
* ``experts``: the expert-skipping kernels (:class:`prunepath.kernels.ffn.SparseFFN`, 16 neurons per expert)
  keeping round((1 − s)·E) experts per token, router bytes included.

Random bf16 weights and N(0, 1) inputs (a different input per layer); ``--engine SHAPE`` also times whole decode
steps of a random-init model of that shape with TEAL wrappers (thresholds from a forward on random tokens)
against the same engine with the thresholds off. Checks every threshold point against the float32 reference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ffn_stack  # noqa: E402
from ffn_stack import ALIASES, SHAPES, bench_graph, graph_of, make_layers, tau_for  # noqa: E402

TUNINGS = [  # blocks and rows per program of ThresholdFFN; the first is the class default
    {}, {"k_chunk": 256, "j_chunk": 256}, {"k_chunk": 512, "j_chunk": 1024}, {"k_chunk": 1024, "j_chunk": 2048},
    {"block_k": 32, "block_m": 256, "k_chunk": 512, "block_j": 32, "block_d": 256, "j_chunk": 1024},
    {"k_chunk": 512, "j_chunk": 1024, "warps": 8},
    {"block_k": 32, "block_m": 128, "k_chunk": 512, "block_j": 32, "block_d": 128, "j_chunk": 1024},
]


def gap_quantile(a: torch.Tensor, s: float) -> float:
    """The s-quantile of ``a`` placed halfway between two neighbouring values, so the kernel's and the
    reference's rounding cannot put an entry on different sides of it."""
    v = a.flatten().sort().values
    i = min(int(s * (v.numel() - 1)), v.numel() - 2)
    return float((v[i] + v[i + 1]) / 2)


def layer_thresholds(x: torch.Tensor, p, s: float) -> tuple[float, float, float]:
    """(t_in, t_mid, realised byte fraction) at the s-quantiles of |x| and of |h| after the input mask."""
    from prunepath.kernels.layout import _act_reference
    xa = x.float().abs().flatten()
    t_in = gap_quantile(xa, s)
    keep_x = x.float().masked_fill(x.float().abs() <= t_in, 0)
    w_in, b_in, _ = p.dense_weights()
    pre = keep_x @ w_in.float().t() + (b_in.float() if b_in is not None else 0)
    n = p.neurons_per_expert
    pre = pre.view(x.shape[0], p.num_experts, -1)
    h = (_act_reference(p.activation, pre[..., :n]) * pre[..., n:] if p.gated else
         _act_reference(p.activation, pre)).flatten()
    t_mid = gap_quantile(h.abs(), s)
    s_in = float((xa <= t_in).float().mean())
    s_mid = float((h.abs() <= t_mid).float().mean())
    byte = (2 * s_in + s_mid) / 3 if p.gated else (s_in + s_mid) / 2
    return t_in, t_mid, byte


def run_shape(name: str, sparsities: list[float], dev: str, tunings: list[dict], log) -> list[dict]:
    from prunepath.kernels.ffn import SparseFFN, dense_ffn
    from prunepath.kernels.reference import threshold_ffn_reference
    from prunepath.kernels.thresholds import ThresholdFFN, thresholds_tensor
    from prunepath.routing.config import RoutingConfig
    shape = SHAPES[name]
    layers = make_layers(shape, dev, neurons=shape["ff"])  # one 'expert' per layer: the plain FFN
    d = shape["d"]
    gen = torch.Generator(device=dev).manual_seed(0)
    xs = [torch.randn(1, d, device=dev, generator=gen).to(torch.bfloat16) for _ in layers]
    out = torch.zeros(1, d, dtype=torch.float32, device=dev)

    def dense_fn():
        for p, x in zip(layers, xs):
            out.add_(dense_ffn(x, p).float())
    dense_ms = bench_graph(graph_of(dense_fn))
    recs = [{"shape": name, "mode": "dense", "target_s": 0.0, "ms": dense_ms, "speedup": 1.0}]
    log(f"{name}: dense cuBLAS {dense_ms * 1e3 / len(layers):.1f} us/layer ({len(layers)} layers)")
    thr = [thresholds_tensor(None, None, dev) for _ in layers]
    per_s = {s: [layer_thresholds(x, p, s) for p, x in zip(layers, xs)] for s in sparsities}
    best = None
    for ti, tun in enumerate(tunings):
        ffns = [ThresholdFFN(p, 1, t, **tun) for p, t in zip(layers, thr)]

        def thr_fn():
            for f, x in zip(ffns, xs):
                f(x, out)
        g = graph_of(thr_fn)
        for s in [0.0] + sparsities:
            for t, vals in zip(thr, per_s.get(s, [(None, None, 0.0)] * len(layers))):
                t.copy_(thresholds_tensor(vals[0], vals[1], dev))
            ms = bench_graph(g)
            byte = statistics.fmean(v[2] for v in per_s[s]) if s else 0.0
            # correctness on the first and last layer, at these thresholds, against the float32 reference
            err = 0.0
            for i in (0, len(layers) - 1):
                o = torch.zeros(1, d, dtype=torch.float32, device=dev)
                ffns[i](xs[i], o)
                t_in, t_mid = (per_s[s][i][0], per_s[s][i][1]) if s else (None, None)
                ref = threshold_ffn_reference(xs[i], layers[i], t_in, t_mid, dtype=torch.float32,
                                              round_to=layers[i].dtype)
                err = max(err, float((o - ref).norm() / ref.norm()))
            recs.append({"shape": name, "mode": "threshold", "tuning": tun, "target_s": s, "s_ffn": byte, "ms": ms,
                         "speedup": dense_ms / ms, "rel_err": err})
            log(f"  threshold {tun or 'default'} s={s:.2f} (bytes {byte:.3f}): {ms * 1e3 / len(layers):.1f} us/layer, "
                f"{dense_ms / ms:.2f}x dense, rel err {err:.1e}")
        at = [r for r in recs if r["mode"] == "threshold" and r["tuning"] == tun]
        score = statistics.fmean(r["ms"] for r in at)
        if best is None or score < best[0]:
            best = (score, ti)
        del ffns, g
    for r in recs:
        if r["mode"] == "threshold":
            r["best_tuning"] = r["tuning"] == tunings[best[1]]
    del layers
    torch.cuda.empty_cache() if dev == "cuda" else None
    # expert skipping at the same byte fractions (16 neurons per expert, router read every step)
    elayers = make_layers(shape, dev, neurons=16)
    e = elayers[0].num_experts
    ffns = [SparseFFN(p, 1, RoutingConfig(tau=1.05)) for p in elayers]

    def exp_fn():
        for f, x in zip(ffns, xs):
            f(x, out)
    g = graph_of(exp_fn)
    router_frac = ffn_stack.granularity(shape, 16)["router_bytes_frac"]
    for s in sparsities:
        k = max(1, round((1 - s) * e))
        for f in ffns:
            f.set_tau(tau_for(k, e))
        ms = bench_graph(g)
        recs.append({"shape": name, "mode": "experts", "neurons_per_expert": 16, "target_s": s,
                     "s_ffn": 1 - k / e, "router_bytes_frac": router_frac, "ms": ms, "speedup": dense_ms / ms})
        log(f"  experts n=16 keep {k}/{e} (s {1 - k / e:.3f}, router {router_frac:.3f}): "
            f"{ms * 1e3 / len(elayers):.1f} us/layer, {dense_ms / ms:.2f}x dense")
    return recs


def run_engine(name: str, sparsities: list[float], dev: str, log, new: int = 128, reps: int = 5) -> list[dict]:
    """Whole decode steps of a random-init model with TEAL wrappers against the same engine, thresholds off."""
    from decode import hf_config, sync
    from transformers import AutoModelForCausalLM
    from prunepath.baselines.activation import ActivationSparsity, apply_activation_sparsity
    from prunepath.decoding.engine import DecodeEngine
    torch.manual_seed(0)
    cfg = hf_config(name, tiny=dev != "cuda")
    model = AutoModelForCausalLM.from_config(cfg).to(dev).eval()
    n = cfg.num_hidden_layers
    xs, hs = {}, {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.mlp.register_forward_pre_hook(lambda m, a, i=i: xs.__setitem__(i, a[0].detach())))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: hs.__setitem__(i, a[0].detach())))
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (4, 128), device=dev))
    for h in hooks:
        h.remove()

    def q(t, s):
        a = t.float().abs().flatten()
        a = a[torch.randperm(a.numel(), device=a.device)[: 1 << 20]]
        return float(torch.quantile(a, s))
    specs = {s: ([q(xs[i], s) for i in range(n)], [q(hs[i], s) for i in range(n)]) for s in sparsities}
    s0 = sparsities[0]
    apply_activation_sparsity(model, ActivationSparsity(method="teal", target=s0, allocation="uniform",
                                                        t_in=specs[s0][0], t_mid=specs[s0][1]))
    eng = DecodeEngine(model, batch=1, max_len=new + 32)
    ids = torch.randint(0, cfg.vocab_size, (1, 16), device=dev)

    def ms_per_token() -> float:
        eng.generate(ids, 4)  # compile + capture
        times = []
        for _ in range(reps):
            sync(torch.device(dev))
            t0 = time.perf_counter()
            eng.generate(ids, new)
            sync(torch.device(dev))
            times.append((time.perf_counter() - t0) * 1e3 / new)
        return statistics.median(times)
    recs = []
    eng.set_thresholds([None] * n, [None] * n)
    dense = ms_per_token()
    recs.append({"shape": name, "mode": "engine-dense", "target_s": 0.0, "ms_per_token": dense, "speedup": 1.0})
    log(f"engine {name}: dense {dense:.3f} ms/token")
    for s in sparsities:
        eng.set_thresholds(*specs[s])
        ms = ms_per_token()
        recs.append({"shape": name, "mode": "engine-teal", "target_s": s, "ms_per_token": ms, "speedup": dense / ms})
        log(f"engine {name}: TEAL s={s:.2f} {ms:.3f} ms/token, {dense / ms:.2f}x")
    eng.set_thresholds([None] * n, [None] * n)
    again = ms_per_token()
    recs.append({"shape": name, "mode": "engine-dense-again", "target_s": 0.0, "ms_per_token": again,
                 "speedup": dense / again})
    log(f"engine {name}: dense again {again:.3f} ms/token (drift {again / dense - 1:+.1%})")
    return recs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="smollm2,llama3-8b")
    ap.add_argument("--sparsities", default="0.3,0.4,0.5,0.6")
    ap.add_argument("--engine", default="", help="a shape whose whole decode step is timed too (e.g. smollm2)")
    ap.add_argument("--tunings", type=int, default=len(TUNINGS), help="how many block tunings to try")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    ap.add_argument("--out", default="benchmarks/results/threshold-ffn-h200.json")
    a = ap.parse_args(argv)
    from common import machine, write_json
    sparsities = [float(s) for s in a.sparsities.split(",") if s]
    if a.smoke:
        ffn_stack.DEV = dev = "cpu"
        shapes = ["tiny", "tiny-gpt2"]
    else:
        if not torch.cuda.is_available():
            print("threshold_ffn: no CUDA GPU here (use --smoke for the CPU interpreter check)", file=sys.stderr)
            return 2
        dev = "cuda"
        shapes = [ALIASES.get(s, s) for s in a.shapes.split(",") if s]
    recs = []
    for s in shapes:
        recs += run_shape(s, sparsities, dev, TUNINGS[: max(1, a.tunings)], print)
    if a.engine:
        recs += run_engine(ALIASES.get(a.engine, a.engine), sparsities, dev, print, new=8 if a.smoke else 128,
                           reps=1 if a.smoke else 5)
    payload = {"benchmark": "threshold_ffn", "machine": machine(), "batch": 1, "records": recs}
    out = Path(a.out)
    if out.suffix != ".json":
        out = out / "threshold-ffn-smoke.json"
    if out.parent.resolve() == (Path(__file__).resolve().parent / "results"):
        print(f"wrote {write_json(out.name, payload)}")
    else:
        from prunepath.evaluation.reports import atomic_write_text
        import json
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"wrote {atomic_write_text(out, json.dumps(payload, indent=2) + chr(10))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
