"""Speed of `prunepath eval --task ppl`: old vs new scoring path, float32 vs bfloat16, against the bare forward.

The tool must run at the model's forward speed (no per-token Python work). Run (self-contained, ~5 min on 2 cores):

    python benchmarks/eval_speed.py --tokens 4096 --threads 2 --rounds 5 --ppl-tokens 16384 --compile --gemm
    python benchmarks/eval_speed.py --converted --tau 0.7          # a converted (routed-FFN) model
    python benchmarks/eval_speed.py --random-weights --threads 2    # SmolLM2-135M shapes, no download needed

Variants, all in one process on the same windows (window 512, stride 512, --batch-size windows per forward):
  forward fp32      bare ``model(ids).logits`` (no loss): the model's own speed
  old tool fp32     evaluate_perplexity(fused_head=False): full [B, T, V] logits + cross-entropy (previous path)
  tool fp32         evaluate_perplexity (default): LM head + loss on scored positions only, chunked
  forward bf16      bare forward of a bfloat16 copy
  tool bf16         evaluate_perplexity on the bfloat16 copy (`prunepath eval --dtype bf16`)
  forward bf16 compiled   (with --compile) the bare bf16 forward under torch.compile
Rounds cycle through the variants (v1, v2, ..., v1, v2, ...) so that load from other processes hits all alike;
medians are reported, plus ratios to "forward fp32", and the 1-minute load average before and after. Then the PPL
of fp32 and bf16 is measured once on --ppl-tokens tokens (default 16384), giving the bf16 PPL difference and a
long-run tok/s. Writes benchmarks/results/eval-speed[-random][-converted].json atomically.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def gemm_throughput(device: str, rows: int = 2048, reps: int = 5) -> dict[str, float]:
    """Median GFLOP/s of ``F.linear`` at SmolLM2-135M's shapes (in x out): MLP up 576x1536, MLP down 1536x576,
    LM head 576x49152, in float32 and bfloat16 (random values; speed does not depend on them)."""
    import statistics
    import torch.nn.functional as F

    out = {}
    for k, n in ((576, 1536), (1536, 576), (576, 49152)):
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, k, device=device).to(dt)
            w = torch.randn(n, k, device=device).to(dt)
            F.linear(x, w)
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                F.linear(x, w)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                ts.append(time.perf_counter() - t)
            out[f"{k}x{n} {str(dt).replace('torch.', '')}"] = 2 * rows * k * n / statistics.median(ts) / 1e9
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="wikitext-2/wiki.valid.raw")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per timed round")
    ap.add_argument("--ppl-tokens", type=int, default=16384, help="tokens for the fp32-vs-bf16 PPL check (0: skip)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--converted", action="store_true", help="measure a converted model (48x32 experts)")
    ap.add_argument("--tau", type=float, default=0.7)
    ap.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 variants")
    ap.add_argument("--gemm", action="store_true",
                    help="also measure fp32 and bf16 GEMM throughput (GFLOP/s) at SmolLM2-135M's linear shapes")
    ap.add_argument("--compile", action="store_true",
                    help="also time the bare bf16 forward under torch.compile (inductor); compile time is recorded")
    ap.add_argument("--random-weights", action="store_true",
                    help="SmolLM2-135M architecture with random weights and random token ids (speed does not "
                         "depend on the values; runs where the real model is not available)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import prunepath
    from prunepath.evaluation.common import machine_info
    from prunepath.evaluation.perplexity import evaluate_perplexity, plan_windows, tokenize_text, window_batches
    from prunepath.evaluation.reports import write_json

    load_before = os.getloadavg()[0]
    if args.random_weights:
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                          rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1,
                          eos_token_id=2, pad_token_id=2)
        torch.manual_seed(0)
        model, tok = LlamaForCausalLM(cfg).eval(), None
        model.prunepath_display_name = "SmolLM2-135M architecture (random weights)"
    else:
        model, tok = prunepath.load_model(args.model)
    if args.converted:
        prunepath.moefy(model, neurons_per_expert=32, progress=False)
        prunepath.configure(model, tau=args.tau)
    n_ids = max(args.tokens, args.ppl_tokens)
    all_ids = (torch.randint(3, 49152, (n_ids,), generator=torch.Generator().manual_seed(0))
               if args.random_weights else tokenize_text(tok, args.data, n_ids))
    ids = all_ids[:args.tokens]
    plan = plan_windows(int(ids.numel()), args.window, args.window, False)
    batches = [b[0] for b in window_batches(ids, plan, None, 0, args.batch_size)]
    scored = sum(e - f for _, e, f in plan)
    model.to(args.device)
    batches = [b.to(args.device) for b in batches]
    models = {"fp32": model}
    if not args.no_bf16:
        models["bf16"] = copy.deepcopy(model).to(torch.bfloat16)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def forward(m):
        def run() -> dict:
            with torch.inference_mode():
                for x in batches:
                    m(input_ids=x, use_cache=False).logits
            sync()
            return {}
        return run

    def tool(m, fused: bool = True, which=ids):
        def run() -> dict:
            r = evaluate_perplexity(m, tok, which.tolist(), window=args.window, batch_size=args.batch_size,
                                    device=args.device, progress=False, fused_head=fused)
            sync()
            return r
        return run

    variants = {"forward fp32": forward(model), "old tool fp32": tool(model, fused=False), "tool fp32": tool(model)}
    if "bf16" in models:
        variants.update({"forward bf16": forward(models["bf16"]), "tool bf16": tool(models["bf16"])})
    for m in models.values():  # warm-up (first-call allocations, oneDNN primitive creation)
        with torch.inference_mode():
            m(input_ids=batches[0][:1, :64], use_cache=False)
    compile_s = None
    if args.compile and "bf16" in models:
        compiled = torch.compile(models["bf16"], dynamic=False)
        t = time.perf_counter()
        forward(compiled)()  # compiles once per distinct batch shape
        compile_s = time.perf_counter() - t
        variants["forward bf16 compiled"] = forward(compiled)
    times: dict[str, list[float]] = {k: [] for k in variants}
    results: dict[str, dict] = {}
    for r in range(args.rounds):
        for name, fn in variants.items():
            t = time.perf_counter()
            res = fn()
            times[name].append(time.perf_counter() - t)
            if res:
                results[name] = res
        print(f"round {r + 1}/{args.rounds} done, load avg {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    base = statistics.median(times["forward fp32"])
    table = {name: {"tok_s": scored / statistics.median(ts), "x_forward_fp32": base / statistics.median(ts),
                    "rounds_s": ts} for name, ts in times.items()}
    for name, res in results.items():
        table[name].update(ppl=res["ppl"], s_ffn=res["s_ffn"])

    gemm = gemm_throughput(args.device) if args.gemm else None

    ppl_check = None
    if args.ppl_tokens and "bf16" in models:
        long_ids = all_ids[:args.ppl_tokens]
        ppl_check = {"tokens": None}
        for key, m in models.items():
            t = time.perf_counter()
            res = tool(m, which=long_ids)()
            dt = time.perf_counter() - t
            ppl_check["tokens"] = res["tokens"]
            ppl_check[key] = {"ppl": res["ppl"], "s_ffn": res["s_ffn"], "tok_s": res["tokens"] / dt}
        ppl_check["bf16_minus_fp32"] = ppl_check["bf16"]["ppl"] - ppl_check["fp32"]["ppl"]
        ppl_check["bf16_rel_diff"] = ppl_check["bf16_minus_fp32"] / ppl_check["fp32"]["ppl"]

    name = getattr(model, "prunepath_display_name", args.model) + (
        f" + PrunePath 48x32 (untrained), tau {args.tau}" if args.converted else "")
    out = {"model": name, "tokens": scored, "window": args.window, "batch_size": args.batch_size,
           "threads": args.threads, "rounds": args.rounds, "statistic": "median of rounds", "variants": table,
           "ppl_check": ppl_check, "compile_s": compile_s, "gemm_gflop_s": gemm,
           "load_avg_1min_before": load_before, "load_avg_1min_after": os.getloadavg()[0],
           "machine": machine_info(), "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": "python benchmarks/eval_speed.py " + " ".join(sys.argv[1:])}
    # Kept for readers of the previous format: the default tool path vs the bare fp32 forward.
    out.update(forward_tok_s=table["forward fp32"]["tok_s"], tool_tok_s=table["tool fp32"]["tok_s"],
               tool_over_forward=table["tool fp32"]["tok_s"] / table["forward fp32"]["tok_s"])
    lines = [f"{name}: {scored} scored tokens/round, {args.threads} threads, median of {args.rounds} rounds", "",
             "| variant | tok/s | x forward fp32 | PPL |", "|---|---:|---:|---:|"]
    for k, v in table.items():
        ppl = f"{v['ppl']:.4f}" if "ppl" in v else ""
        lines.append(f"| {k} | {v['tok_s']:.0f} | {v['x_forward_fp32']:.2f} | {ppl} |")
    if ppl_check:
        lines.append(f"\nPPL on {ppl_check['tokens']} tokens: fp32 {ppl_check['fp32']['ppl']:.4f} "
                     f"({ppl_check['fp32']['tok_s']:.0f} tok/s), bf16 {ppl_check['bf16']['ppl']:.4f} "
                     f"({ppl_check['bf16']['tok_s']:.0f} tok/s); bf16 - fp32 = {ppl_check['bf16_minus_fp32']:+.4f} "
                     f"({100 * ppl_check['bf16_rel_diff']:+.3f}%)")
    if gemm:
        lines.append("GEMM GFLOP/s (M = 2048 rows): " + ", ".join(f"{k} {v:.0f}" for k, v in gemm.items()))
    if compile_s is not None:
        lines.append(f"torch.compile: first pass (compilation + one forward of every batch) {compile_s:.0f} s")
    lines.append(f"load avg (1 min) before {load_before:.2f}, after {out['load_avg_1min_after']:.2f}")
    print("\n".join(lines))
    tag = ("-random" if args.random_weights else "") + ("-converted" if args.converted else "")
    path = args.out or str(Path(__file__).parent / "results" / f"eval-speed{tag}.json")
    write_json(path, out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
