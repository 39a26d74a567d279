"""End-to-end decode benchmark (GPU): HF eager dense vs dense static-cache + CUDA graph vs PrunePath sparse.

    python benchmarks/decode.py --shapes llama3-8b,gpt2-medium --batches 1,8 --prompt 512 --new 128
    python benchmarks/decode.py --shapes smollm2-135m --neurons-per-expert 16,32,64 --batches 1 \
        --densities 0.5,0.3,0.1 --hf-new 0 --no-legacy --grouped-densities ""   # expert granularity

Random bf16 weights of the real shapes (no downloads). The PrunePath model is the same model converted with
random clustering (``--neurons-per-expert`` N, default 32; a list converts a fresh copy of the model per size
after the dense baselines, and every PrunePath record carries N, E and the router's bytes per layer); FFN density is forced through the router: a near-uniform random
router (logit std ≈ 0.01) with the paper's cumulative rule at τ = (k + ½)/E keeps ≈ k experts per token, a
different random set per token and layer. τ changes between densities without recapturing the graph.
Per (shape, batch): ms/token and tokens/s of the decode loop (prefill excluded), peak memory of the decode
(engine weights + caches, the HF model moved off the GPU), the FFN stack alone inside the engine (one CUDA
graph over every layer's FFN) with its bandwidth floor, and a GPU correctness check of the FFN kernels.
Engines: hf-eager, dense-graph, prunepath-sparse (routing + expert kernels), prunepath-dense (the
dense-equivalent GatedDense path), prunepath-dense-legacy (router kernel + gated cuBLAS, d = 1.0, batch 1), and
"prunepath" = the faster of sparse / dense at that batch (what the engine's measured crossover dispatches to).
Prefill: the engine's default dense-equivalent prefill, plus the grouped prefill (tokens sorted by expert,
``torch._grouped_mm``) at ``--grouped-densities``. ``--density-profile`` replaces the densities by a trained
model's per-token expert counts (records with density "profile:<tau>"). ``--deadline`` stops before work that
would start after it; records are written atomically as they are made.
Writes records to $OUT/decode-<tag>.json (copy to benchmarks/results/).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ffn_stack import ALIASES, bench_graph, check_correctness, copy_bandwidth, graph_of  # noqa: E402

NEURONS = 32


def hf_config(name: str, tiny: bool = False):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config
    if tiny:  # CPU smoke test of this script
        if name == "gpt2-medium":
            return GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256)
        return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if name == "llama3-8b":
        return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                           max_position_embeddings=8192, rms_norm_eps=1e-5)
    if name == "qwen2-7b":
        return Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                           num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6,
                           max_position_embeddings=32768, rms_norm_eps=1e-6)
    if name == "gpt2-medium":
        return GPT2Config(vocab_size=50257, n_embd=1024, n_layer=24, n_head=16, n_positions=1024)
    if name == "smollm2-135m":
        return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                           max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)
    raise SystemExit(f"unknown shape {name}")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_reset(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_mb(dev) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else float("nan")


def hf_eager(model, ids, new, dev):
    """HF generate (dynamic cache, eager): ms/token of the decode = (T(new) − T(1)) / (new − 1)."""
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
    times = {}
    for n in (1, new):
        peak_reset(dev)
        sync(dev)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        sync(dev)
        times[n] = time.perf_counter() - t0
    return (times[new] - times[1]) / (new - 1) * 1e3, peak_mb(dev), times[1] * 1e3


def time_prefill(eng, ids, dev, reps: int = 3) -> float:
    """Median wall time of the engine's prefill (ms), after one warm-up."""
    eng.prefill(ids)
    pre = []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        eng.prefill(ids)
        sync(dev)
        pre.append(time.perf_counter() - t0)
    return sorted(pre)[len(pre) // 2] * 1e3


def allocated_mb(dev) -> float:
    return torch.cuda.memory_allocated() / 2**20 if dev.type == "cuda" else float("nan")


def time_engine(eng, ids, new, dev):
    """Decode loop of the engine: ms/token excluding prefill, peak memory of prefill + decode, prefill ms, and the
    memory held just before the timed generation (engine tensors, captured graphs), so the peak can be split
    into what the engine holds and what prefill + decode add on top."""
    eng.generate(ids, 3)  # compile + capture
    pre_ms = time_prefill(eng, ids, dev)
    peak_reset(dev)
    start_mb = allocated_mb(dev)
    sync(dev)
    t0 = time.perf_counter()
    eng.generate(ids, new)
    sync(dev)
    total = time.perf_counter() - t0
    return (total * 1e3 - pre_ms) / (new - 1), peak_mb(dev), pre_ms, start_mb


def engine_ffn_ms(eng, dev):
    """The FFN stack alone, with the engine's own weights: one graph over every layer; also the mean active
    experts per layer (router counts after the run)."""
    from prunepath.kernels.ffn import dense_ffn
    x = torch.randn(eng.batch, eng.hidden, device=dev).to(eng.dtype)
    res = torch.zeros(eng.batch, eng.hidden, device=dev)

    def fn():
        for layer in eng.layers:
            if layer.sparse is not None:
                layer.sparse(x, res)
            else:
                res.add_(dense_ffn(x, layer.ffn).float())
    if dev.type != "cuda":
        fn()
        ms = float("nan")
    else:
        g = graph_of(fn)
        ms = bench_graph(g)
        g.replay()
        sync(dev)
    active = float("nan")
    if eng.layers[0].sparse is not None and eng.ffn_mode == "sparse":
        active = float(torch.stack([l.sparse.router.count.float() for l in eng.layers]).mean())
    elif eng.layers[0].sparse is not None:
        active = float(eng.layers[0].ffn.num_experts)
    return ms, active


class Budget:
    """Measure-and-stop: ``late()`` once the deadline (epoch seconds, 0 = none) has passed."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def late(self, margin: float = 0.0) -> bool:
        return bool(self.deadline) and time.time() + margin > self.deadline


def ffn_bytes(eng, active: float) -> float:
    p = eng.layers[0].ffn
    e, r, d = p.w_in.shape
    n = p.neurons_per_expert
    esz = p.w_in.element_size()
    per_expert = (r + n) * d * esz
    router = e * d * esz if eng.converted else 0
    return len(eng.layers) * (active * per_expert + router)


def _model(name, dev, tiny):
    from transformers import AutoModelForCausalLM
    cfg = hf_config(name, tiny)
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    return model.eval(), cfg


def _free(dev):
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def ffn_width(cfg) -> int:
    return getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * cfg.n_embd


def run_shape(name, batches, densities, prompt, new, dev, gpu, bw, *, tiny=False, log=print, budget=None,
              hf_new=8, emit=None, profile=None, grouped_densities=(0.3,), legacy=True, auto_only=False,
              neurons=(NEURONS,)):
    """Every engine for one shape; ``emit(record)`` is called as each record is made (partial results).
    ``neurons``: the expert sizes N to convert the model with (one fresh conversion each, same dense weights)."""
    from prunepath.decoding.engine import DecodeEngine
    budget = budget or Budget(0)
    recs = []

    def add(rec):
        recs.append(rec)
        if emit:
            emit(rec)

    t0 = time.time()
    model, cfg = _model(name, dev, tiny)
    log(f"{name}: model built in {time.time() - t0:.0f}s")
    vocab = cfg.vocab_size
    max_len = prompt + new + 8
    base = dict(shape=name, gpu=gpu, prompt=prompt, new_tokens=new, dtype=str(next(model.parameters()).dtype),
                copy_gbps=bw / 1e9, date=_dt.date.today().isoformat(), command=" ".join(["python3"] + sys.argv),
                peak_method="max_memory_allocated over prefill + decode, HF model moved to the host")
    dense_ms = {}
    ids_of = {b: torch.randint(0, vocab, (b, prompt), device=dev, generator=torch.Generator(device=dev).manual_seed(b))
              for b in batches}
    for b in batches:  # dense model: HF eager, then the dense engine
        if budget.late():
            break
        ids = ids_of[b]
        if profile is None and hf_new > 1:
            ms, pk, pre = hf_eager(model, ids, hf_new, dev)
            add(dict(base, batch=b, density=1.0, engine="hf-eager", ms_per_token=ms, tokens_per_s=1e3 * b / ms,
                     peak_mem_mb=pk, prefill_ms=pre, ffn_ms=None, ffn_floor_ms=None, hf_new_tokens=hf_new))
            log(f"{name} b{b} hf-eager {ms:.2f} ms/token peak {pk:.0f} MB ({hf_new} tokens)")
        eng = DecodeEngine(model, batch=b, max_len=max_len, ffn="dense", device=dev)
        model.to("cpu")  # the engine holds its own tensors: peak memory is the engine's
        _free(dev)
        ms, pk, pre, start_mb = time_engine(eng, ids, new, dev)
        fms, _ = engine_ffn_ms(eng, dev)
        floor = ffn_bytes(eng, 1.0) / bw * 1e3
        add(dict(base, batch=b, density=1.0, engine="dense-graph", ms_per_token=ms, tokens_per_s=1e3 * b / ms,
                 peak_mem_mb=pk, start_mem_mb=start_mb, prefill_ms=pre, ffn_ms=fms, ffn_floor_ms=floor,
                 ffn_gbps=floor * bw / 1e9 / fms if fms == fms else None))
        log(f"{name} b{b} dense-graph {ms:.3f} ms/token ffn {fms:.3f} (floor {floor:.3f}) peak {pk:.0f} MB "
            f"prefill {pre:.1f} ms")
        dense_ms[b] = ms
        del eng
        _free(dev)
        model.to(dev)
    d = cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.n_embd
    ff = ffn_width(cfg)
    dense_base = base
    for ni, n in enumerate(neurons):
        if budget.late():
            break
        if ff % n:
            add(dict(dense_base, neurons_per_expert=n, engine="skipped", reason=f"d_ff {ff} is not a multiple of {n}"))
            log(f"{name} N={n}: skipped (d_ff {ff} is not a multiple of N)")
            continue
        if ni:  # a fresh copy of the dense model (seeded: the same weights) for this expert size
            del model
            _free(dev)
            model, _ = _model(name, dev, tiny)
        model = _run_converted(model, name, n, d, ff, batches, densities, dev, bw, budget, dense_base, dense_ms,
                               ids_of, max_len, new, add, log, profile, grouped_densities, legacy, auto_only)
    del model
    _free(dev)
    return recs


def _run_converted(model, name, n, d, ff, batches, densities, dev, bw, budget, base, dense_ms, ids_of, max_len, new,
                   add, log, profile, grouped_densities, legacy, auto_only):
    """Convert ``model`` at N neurons per expert and time every PrunePath engine; returns the model."""
    import prunepath
    from prunepath.decoding.engine import DecodeEngine
    prunepath.moefy(model, neurons_per_expert=n, clustering="random", progress=False)
    for f in prunepath.prunepath_modules(model):
        torch.nn.init.normal_(f.router.weight, std=0.01 / math.sqrt(d))
    e = prunepath.prunepath_modules(model)[0].num_experts
    esz = 2 if dev.type == "cuda" else 4
    gated = getattr(model.config, "model_type", "") != "gpt2"  # Llama-like: gate, up, down; GPT-2: up, down
    base = dict(base, neurons_per_expert=n, num_experts=e, router_bytes_per_layer=d * e * esz,
                router_bytes_frac=(d * e) / ((3 if gated else 2) * ff * d))
    for b in batches:
        if budget.late() or b not in dense_ms:
            break
        ids = ids_of[b]
        prunepath.configure(model, tau=1.05)
        eng = DecodeEngine(model, batch=b, max_len=max_len, ffn="sparse", device=dev)
        model.to("cpu")
        _free(dev)
        if dev.type == "cuda":
            for m in ("sparse", "dense"):
                corr = check_correctness([eng.layers[0].ffn], b, {}, mode=m)
                add(dict(base, batch=b, engine=f"check-{m}", **corr))
                log(f"{name} N={n} b{b} correctness {m} {corr}")
        if profile is not None:
            _run_profile(eng, profile, ids, new, dev, e, b, base, dense_ms, bw, add, log, name)
        for dens in ([] if profile is not None else densities):
            if budget.late():
                break
            k = max(1, round(dens * e))
            tau = (k + 0.5) / e if k < e else 1.05
            if auto_only:  # what ffn="auto" runs, plus the sparse kernels at d = 1.0 (their full-density cost)
                eng.routing.tau = tau
                modes = [eng.resolve_mode("auto")] + (["sparse"] if dens >= 1.0 and b < eng.crossover else [])
            else:
                modes = ["sparse", "dense"] + (["dense_legacy"] if legacy and dens >= 1.0 and b == 1 else [])
            got = {}
            for mode in modes:
                if budget.late():
                    break
                eng.routing.tau = tau
                eng.sync_routing(eng.routing, mode)  # τ only → same graph; a mode change → recapture
                ms, pk, pre, start_mb = time_engine(eng, ids, new, dev)
                fms, active = engine_ffn_ms(eng, dev)
                floor = ffn_bytes(eng, k if mode == "sparse" else e) / bw * 1e3
                rec = dict(base, batch=b, density=dens, engine=f"prunepath-{mode.replace('_', '-')}",
                           tau=tau, measured_density=active / e, ms_per_token=ms, tokens_per_s=1e3 * b / ms,
                           peak_mem_mb=pk, start_mem_mb=start_mb, prefill_ms=pre, ffn_ms=fms,
                           ffn_floor_ms=floor, ffn_gbps=floor * bw / 1e9 / fms if fms == fms else None,
                           speedup_vs_dense_graph=dense_ms[b] / ms)
                got[mode] = rec
                add(rec)
                log(f"{name} b{b} d{dens:.2f} {rec['engine']} {ms:.3f} ms/token ({dense_ms[b] / ms:.2f}x dense-graph) "
                    f"ffn {fms:.3f} (floor {floor:.3f}) active {active / e:.2f} peak {pk:.0f} MB prefill {pre:.1f} ms")
            cand = {m: r for m, r in got.items() if m in ("sparse", "dense")}
            if auto_only and modes[0] in got:  # the auto row is the mode auto resolved to, not the faster one
                add(dict(got[modes[0]], engine="prunepath", picked_mode=modes[0], picked_by="auto"))
            elif cand:  # what the measured-crossover dispatch runs: the faster of the two paths
                m, r = min(cand.items(), key=lambda kv: kv[1]["ms_per_token"])
                add(dict(r, engine="prunepath", picked_mode=m))
            if dens in grouped_densities and b == 1 and not budget.late():
                eng.routing.tau = tau
                eng.sync_routing(eng.routing, "dense")
                eng.prefill_mode = "grouped"
                try:
                    gms = time_prefill(eng, ids, dev)
                    from prunepath.kernels.dense import GROUPED_USED
                    add(dict(base, batch=b, density=dens, tau=tau, engine="prunepath-prefill-grouped",
                             prefill_ms=gms, grouped_impl=dict(GROUPED_USED), ms_per_token=None,
                             peak_mem_mb=None, ffn_ms=None, ffn_floor_ms=None))
                    log(f"{name} b{b} d{dens:.2f} grouped prefill {gms:.1f} ms")
                except Exception as exc:  # noqa: BLE001 - record and go on: one failure must not cost the run
                    add(dict(base, batch=b, density=dens, engine="prunepath-prefill-grouped", error=repr(exc)[:300]))
                    log(f"{name} grouped prefill failed: {exc!r}")
                finally:
                    eng.prefill_mode = "dense"
        del eng
        _free(dev)
        model.to(dev)
    return model


def _run_profile(eng, profile, ids, new, dev, e, b, base, dense_ms, bw, add, log, name):
    """Realistic density: per-step, per-layer counts from the profile forced through the top-k rule (the
    graph copies the step's row into the routers' k at its start)."""
    from ffn_stack import profile_counts

    from prunepath.routing.config import RoutingConfig
    kt = profile_counts(profile, len(eng.layers), e, steps=max(new, 16)).to(dev)
    label = f"profile:{profile.get('tau')}"
    for mode in ("sparse", "dense"):
        eng.routing = RoutingConfig(rule="topk", k=e)
        eng.set_ffn_mode(mode)
        kcur = torch.zeros(len(eng.layers), dtype=torch.int32, device=dev)
        step = torch.zeros(1, dtype=torch.long, device=dev)
        for i, layer in enumerate(eng.layers):
            layer.sparse.k_tensor = kcur[i:i + 1]

        def hook(kcur=kcur, step=step):
            kcur.copy_(kt.index_select(0, step).view(-1))
            step.add_(1).remainder_(kt.shape[0])
        eng.step_hook = hook
        ms, pk, pre, start_mb = time_engine(eng, ids, new, dev)
        eng.step_hook = None
        active = float(kt.float().mean())
        floor = ffn_bytes(eng, active if mode == "sparse" else e) / bw * 1e3
        add(dict(base, batch=b, density=label, measured_density=active / e, engine=f"prunepath-{mode}",
                 ms_per_token=ms, tokens_per_s=1e3 * b / ms, peak_mem_mb=pk, start_mem_mb=start_mb,
                 prefill_ms=pre, ffn_ms=None,
                 ffn_floor_ms=floor, speedup_vs_dense_graph=dense_ms[b] / ms, profile_model=profile.get("model"),
                 profile_s_ffn=profile.get("s_ffn"), profile_num_experts=profile.get("num_experts")))
        log(f"{name} b{b} {label} (density {active / e:.3f}) prunepath-{mode} {ms:.3f} ms/token "
            f"({dense_ms[b] / ms:.2f}x dense-graph)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama3-8b,gpt2-medium")
    ap.add_argument("--neurons-per-expert", default=str(NEURONS),
                    help="comma-separated expert sizes N (E = d_ff / N), each converted and timed, e.g. 16,32,64")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--densities", default="1.0,0.5,0.3,0.1")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--hf-new", type=int, default=8, help="tokens for the HF eager timing (0 = skip it)")
    ap.add_argument("--grouped-densities", default="0.3", help="densities at which the grouped prefill is timed")
    ap.add_argument("--no-legacy", action="store_true", help="skip the dense_legacy rows")
    ap.add_argument("--auto-only", action="store_true",
                    help="per batch and density only the FFN path ffn='auto' picks (+ sparse at d = 1.0)")
    ap.add_argument("--density-profile", default="", help="JSON profile: realistic-density rows only")
    ap.add_argument("--deadline", type=float, default=0.0, help="epoch seconds: skip work that starts after it")
    ap.add_argument("--tag", default="h200")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test (needs TRITON_INTERPRET=1)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = ap.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("benchmarks/decode.py times the decode engine on a CUDA GPU and none is visible here. On a "
                         "CPU-only machine run the smoke test: TRITON_INTERPRET=1 python benchmarks/decode.py --tiny "
                         "--shapes llama3-8b --batches 1 --densities 0.3 --prompt 6 --new 3 --hf-new 0")
    if args.tiny and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--tiny runs the kernels in Triton's CPU interpreter: set TRITON_INTERPRET=1")
    try:
        neurons = [int(v) for v in args.neurons_per_expert.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--neurons-per-expert: expected integers, got {args.neurons_per_expert!r}") from None
    dev = torch.device("cuda" if not args.tiny else "cpu")
    gpu = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    bw = copy_bandwidth() if dev.type == "cuda" else 1e11
    print(f"gpu {gpu} copy {bw / 1e12:.2f} TB/s", flush=True)
    profile = None
    if args.density_profile:
        from ffn_stack import load_profile
        profile = load_profile(args.density_profile)
    recs = []
    out = Path(args.out) / f"decode-{args.tag}.json"

    def emit(rec):
        from prunepath.evaluation.reports import atomic_write_text
        recs.append(rec)
        atomic_write_text(out, json.dumps(recs, indent=1))

    budget = Budget(args.deadline)
    for name in [ALIASES.get(s.strip().lower(), s.strip()) for s in args.shapes.split(",") if s.strip()]:
        if budget.late():
            print(f"deadline: skipping {name}", flush=True)
            continue
        try:
            run_shape(name, [int(b) for b in args.batches.split(",")], [float(x) for x in args.densities.split(",")],
                      args.prompt, args.new, dev, gpu, bw, tiny=args.tiny, log=lambda s: print(s, flush=True),
                      budget=budget, hf_new=args.hf_new, emit=emit, profile=profile,
                      grouped_densities=tuple(float(x) for x in args.grouped_densities.split(",") if x),
                      legacy=not args.no_legacy, auto_only=args.auto_only, neurons=neurons)
        except torch.cuda.OutOfMemoryError as exc:
            print(f"{name}: out of memory: {exc}", flush=True)
            emit(dict(shape=name, engine="error", error=repr(exc)[:300]))
            torch.cuda.empty_cache()
    print("\n| shape | N | batch | density | engine | ms/token | tok/s | peak MB | FFN ms | FFN floor ms | prefill ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    f = (lambda v: "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}")
    for r in recs:
        if r.get("engine", "").startswith(("check", "error", "skipped")):
            continue
        print(f"| {r['shape']} | {r.get('neurons_per_expert', '—')} | {r['batch']} | {r['density']} | {r['engine']} | {f(r.get('ms_per_token'))} | "
              f"{f(r.get('tokens_per_s'))} | {f(r.get('peak_mem_mb'))} | {f(r.get('ffn_ms'))} | "
              f"{f(r.get('ffn_floor_ms'))} | {f(r.get('prefill_ms'))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
