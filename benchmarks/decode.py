"""End-to-end decode benchmark (GPU): HF eager dense vs dense static-cache + CUDA graph vs PrunePath sparse.

    python benchmarks/decode.py --shapes llama3-8b,gpt2-medium --batches 1,8 --prompt 512 --new 128

Random bf16 weights of the real shapes (no downloads). The PrunePath model is the same model converted with
random clustering (32 neurons per expert); FFN density is forced through the router: a near-uniform random
router (logit std ≈ 0.01) with the paper's cumulative rule at τ = (k + ½)/E keeps ≈ k experts per token, a
different random set per token and layer. τ changes between densities without recapturing the graph.
Per (shape, batch): ms/token and tokens/s of the decode loop (prefill excluded), peak memory of the decode
(engine weights + caches, the HF model moved off the GPU), the FFN stack alone inside the engine (one CUDA
graph over every layer's FFN) with its bandwidth floor, and a GPU correctness check of the FFN kernels.
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

from ffn_stack import bench_graph, check_correctness, copy_bandwidth, graph_of  # noqa: E402

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


def time_engine(eng, ids, new, dev):
    """Decode loop of the engine: ms/token excluding prefill, peak memory of prefill + decode, prefill ms."""
    eng.generate(ids, 3)  # compile + capture
    pre = []
    for _ in range(3):
        sync(dev)
        t0 = time.perf_counter()
        eng.prefill(ids)
        sync(dev)
        pre.append(time.perf_counter() - t0)
    pre_ms = sorted(pre)[1] * 1e3
    peak_reset(dev)
    sync(dev)
    t0 = time.perf_counter()
    eng.generate(ids, new)
    sync(dev)
    total = time.perf_counter() - t0
    return (total * 1e3 - pre_ms) / (new - 1), peak_mb(dev), pre_ms


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


def ffn_bytes(eng, active: float) -> float:
    p = eng.layers[0].ffn
    e, r, d = p.w_in.shape
    n = p.neurons_per_expert
    esz = p.w_in.element_size()
    per_expert = (r + n) * d * esz
    router = e * d * esz if eng.converted else 0
    return len(eng.layers) * (active * per_expert + router)


def run_shape(name, batches, densities, prompt, new, dev, gpu, bw, tiny=False, log=print):
    from transformers import AutoModelForCausalLM

    import prunepath
    from prunepath.decoding.engine import DecodeEngine
    recs = []
    cfg = hf_config(name, tiny)
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    model.eval()
    log(f"{name}: model built in {time.time() - t0:.0f}s")
    vocab = cfg.vocab_size
    max_len = prompt + new + 8
    base = dict(shape=name, gpu=gpu, prompt=prompt, new_tokens=new, dtype=str(next(model.parameters()).dtype),
                copy_gbps=bw / 1e9, date=_dt.date.today().isoformat())
    dense_ms = {}
    ids_of = {b: torch.randint(0, vocab, (b, prompt), device=dev, generator=torch.Generator(device=dev).manual_seed(b))
              for b in batches}
    for b in batches:  # dense model: HF eager, then the dense engine
        ids = ids_of[b]
        ms, pk, pre = hf_eager(model, ids, new, dev)
        recs.append(dict(base, batch=b, density=1.0, engine="hf-eager", ms_per_token=ms, tokens_per_s=1e3 * b / ms,
                         peak_mem_mb=pk, prefill_ms=pre, ffn_ms=None, ffn_floor_ms=None))
        log(f"{name} b{b} hf-eager {ms:.2f} ms/token peak {pk:.0f} MB")
        eng = DecodeEngine(model, batch=b, max_len=max_len, ffn="dense", device=dev)
        model.to("cpu")  # the engine holds its own tensors: peak memory is the engine's
        torch.cuda.empty_cache() if dev.type == "cuda" else None
        ms, pk, pre = time_engine(eng, ids, new, dev)
        fms, _ = engine_ffn_ms(eng, dev)
        floor = ffn_bytes(eng, 1.0) / bw * 1e3
        recs.append(dict(base, batch=b, density=1.0, engine="dense-graph", ms_per_token=ms, tokens_per_s=1e3 * b / ms,
                         peak_mem_mb=pk, prefill_ms=pre, ffn_ms=fms, ffn_floor_ms=floor,
                         ffn_gbps=floor * bw / 1e9 / fms if fms == fms else None))
        log(f"{name} b{b} dense-graph {ms:.3f} ms/token ffn {fms:.3f} (floor {floor:.3f}) peak {pk:.0f} MB "
            f"prefill {pre:.1f} ms")
        dense_ms[b] = ms
        del eng
        model.to(dev)
    prunepath.moefy(model, neurons_per_expert=NEURONS, clustering="random", progress=False)
    d = cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.n_embd
    for f in prunepath.prunepath_modules(model):
        torch.nn.init.normal_(f.router.weight, std=0.01 / math.sqrt(d))
    e = prunepath.prunepath_modules(model)[0].num_experts
    for b in batches:
        ids = ids_of[b]
        prunepath.configure(model, tau=1.05)
        eng = DecodeEngine(model, batch=b, max_len=max_len, ffn="sparse", device=dev)
        model.to("cpu")
        torch.cuda.empty_cache() if dev.type == "cuda" else None
        corr = check_correctness([eng.layers[0].ffn], b, {}) if dev.type == "cuda" else {}
        log(f"{name} b{b} correctness {corr}")
        for dens in densities:
            k = max(1, round(dens * e))
            tau = (k + 0.5) / e if k < e else 1.05
            modes = ["sparse", "dense"] if dens >= 1.0 or b > 1 else ["sparse"]
            for mode in modes:
                eng.routing.tau = tau
                eng.sync_routing(eng.routing, mode)  # τ only → same graph; a mode change → recapture
                ms, pk, pre = time_engine(eng, ids, new, dev)
                fms, active = engine_ffn_ms(eng, dev)
                floor = ffn_bytes(eng, k if mode == "sparse" else e) / bw * 1e3
                rec = dict(base, batch=b, density=dens, engine="prunepath" if mode == "sparse" else "prunepath-gated-dense",
                           tau=tau, measured_density=active / e, ms_per_token=ms, tokens_per_s=1e3 * b / ms,
                           peak_mem_mb=pk, prefill_ms=pre, ffn_ms=fms, ffn_floor_ms=floor,
                           ffn_gbps=floor * bw / 1e9 / fms if fms == fms else None,
                           speedup_vs_dense_graph=dense_ms[b] / ms, **corr)
                recs.append(rec)
                log(f"{name} b{b} d{dens:.2f} {rec['engine']} {ms:.3f} ms/token ({dense_ms[b] / ms:.2f}x dense-graph) "
                    f"ffn {fms:.3f} (floor {floor:.3f}) active {active / e:.2f} peak {pk:.0f} MB prefill {pre:.1f} ms")
        del eng
        model.to(dev)
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return recs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama3-8b,gpt2-medium")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--densities", default="1.0,0.5,0.3,0.1")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--tag", default="h200")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test (needs TRITON_INTERPRET=1)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    gpu = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    bw = copy_bandwidth() if dev.type == "cuda" else 1e11
    print(f"gpu {gpu} copy {bw / 1e12:.2f} TB/s", flush=True)
    recs = []
    out = Path(args.out) / f"decode-{args.tag}.json"
    for name in args.shapes.split(","):
        recs += run_shape(name, [int(b) for b in args.batches.split(",")],
                          [float(x) for x in args.densities.split(",")], args.prompt, args.new, dev, gpu, bw,
                          tiny=args.tiny, log=lambda s: print(s, flush=True))
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(recs, indent=1))
        os.replace(tmp, out)
    print("\n| shape | batch | density | engine | ms/token | tok/s | peak MB | FFN ms | FFN floor ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in recs:
        f = (lambda v: "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}")
        print(f"| {r['shape']} | {r['batch']} | {r['density']} | {r['engine']} | {r['ms_per_token']:.3f} | "
              f"{r['tokens_per_s']:.0f} | {r['peak_mem_mb']:.0f} | {f(r['ffn_ms'])} | {f(r['ffn_floor_ms'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
