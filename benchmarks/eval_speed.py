"""Speed of `prunepath eval --task ppl` against the model's bare forward pass (same windows, same batches).

The tool must run at the model's forward speed (no per-token Python work). Run:

    nice -n 10 python benchmarks/eval_speed.py --tokens 8192 --threads 2 [--converted --tau 0.7]
    python benchmarks/eval_speed.py --random-weights --threads 2   # SmolLM2-135M shapes, no download needed

Prints a table and writes benchmarks/results/eval-speed[-converted].json. Rounds alternate (forward, tool,
forward, tool, ...) so that load from other processes hits both alike; the best round of each is reported, and the
1-minute load average is recorded.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="wikitext-2/wiki.valid.raw")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--converted", action="store_true", help="measure a converted model (48x32 experts)")
    ap.add_argument("--tau", type=float, default=0.7)
    ap.add_argument("--random-weights", action="store_true",
                    help="SmolLM2-135M architecture with random weights and random token ids (speed does not "
                         "depend on the values; runs where the real model is not available)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import prunepath
    from prunepath.evaluation.common import machine_info
    from prunepath.evaluation.perplexity import _window_inputs, evaluate_perplexity, plan_windows, tokenize_text
    from prunepath.evaluation.reports import write_json

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
    ids = (torch.randint(3, 49152, (args.tokens,), generator=torch.Generator().manual_seed(0))
           if args.random_weights else tokenize_text(tok, args.data, args.tokens))
    plan = plan_windows(int(ids.numel()), args.window, args.window, False)
    batches = []
    for i in range(0, len(plan), args.batch_size):
        chunk = plan[i:i + args.batch_size]
        width = max(e - (1 if s == 0 else s) for s, e, _ in chunk)
        batches.append(_window_inputs(ids, chunk, None, 0, width)[0])
    scored = sum(e - f for _, e, f in plan)

    def bare() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for x in batches:
                model(input_ids=x, use_cache=False).logits
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def tool() -> tuple[float, dict]:
        t = time.perf_counter()
        r = evaluate_perplexity(model, tok, ids.tolist(), window=args.window, batch_size=args.batch_size,
                                device=args.device, progress=False)
        return time.perf_counter() - t, r

    model.to(args.device)
    batches = [b.to(args.device) for b in batches]
    with torch.inference_mode():  # warm-up
        model(input_ids=batches[0][:1, :64], use_cache=False)
    t_bare, t_tool, res = [], [], None
    for _ in range(args.rounds):
        t_bare.append(bare())
        dt, res = tool()
        t_tool.append(dt)
    fwd, tl = scored / min(t_bare), scored / min(t_tool)
    out = {"model": getattr(model, "prunepath_display_name", args.model) + (
               f" + PrunePath 48x32 (untrained), tau {args.tau}" if args.converted else ""),
           "tokens": scored, "window": args.window, "batch_size": args.batch_size, "threads": args.threads,
           "forward_tok_s": fwd, "tool_tok_s": tl, "tool_over_forward": tl / fwd,
           "rounds_forward_s": t_bare, "rounds_tool_s": t_tool, "ppl": res["ppl"], "s_ffn": res["s_ffn"],
           "load_avg_1min": os.getloadavg()[0], "machine": machine_info(),
           "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": "python benchmarks/eval_speed.py " + " ".join(os.sys.argv[1:])}
    print(f"| what | tok/s |\n|---|---:|\n| bare forward (logits only) | {fwd:.0f} |\n"
          f"| evaluate_perplexity (loss, s_FFN, windows) | {tl:.0f} |\n"
          f"| ratio | {tl / fwd:.3f} |\n\n{scored} scored tokens, {args.threads} threads, "
          f"load avg {out['load_avg_1min']:.2f}")
    tag = ("-random" if args.random_weights else "") + ("-converted" if args.converted else "")
    name = args.out or str(Path(__file__).parent / "results" / f"eval-speed{tag}.json")
    write_json(name, out)
    print(f"wrote {name}")


if __name__ == "__main__":
    main()
