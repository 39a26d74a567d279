"""Decode speed of a trained checkpoint at its in-expert threshold points, against the model it came from (GPU).

    python benchmarks/decode_checkpoint.py --checkpoint CKPT --original smollm2-135m --tau 1.05 \
        --inner 0.3,0.4,0.5 --mid-bias 0.15 --calib-data mix:sotu,moby-dick,austen,brown --out OUT.json
    TRITON_INTERPRET=1 python benchmarks/decode_checkpoint.py --smoke --checkpoint CKPT --original DIR ...  # CPU

One process, one prompt, batch 1, the CUDA-graph decode engine for every row (prefill excluded):

* ``original``: the original model's engine (plain dense FFN, cuBLAS): the baseline;
* ``original-torch-plain`` / ``all-on-torch-plain``: the same two with the engine's ``plain="torch"`` FFN (PyTorch's
  separate activation, product and residual-add kernels instead of the fused ones): what the fused path gains;
* ``all-on``: the checkpoint at ``--tau`` with no thresholds (an ungated checkpoint at τ > 1 runs the plain FFN);
* ``thresholds``: the checkpoint with in-expert thresholds calibrated for each ``--inner`` fraction (on
  ``--calib-data``, as ``prunepath generate --inner-sparsity`` does), decoded by the threshold kernels; the
  thresholds change in place, without a recapture;
* ``points``: each ``--points`` pair τ:f, the checkpoint at τ (the router runs; below 1 the sparse expert kernels
  skip the dropped experts) with in-expert thresholds calibrated at that τ for the fraction f (0 = none);
* ``original-again``: the baseline re-timed at the end (drift of the machine over the run).

Real weights, so the rows skipped per token are the checkpoint's own; the greedy tokens of every row are kept
in the JSON, and how many of the first ones match the all-on row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPT = "The history of the city begins in the early middle ages, when"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_engine(eng, ids: torch.Tensor, new: int, reps: int) -> tuple[float, list[int]]:
    """(median ms per decode step over ``reps`` runs of ``new`` tokens, the greedy tokens of the last run)."""
    eng.generate(ids, 4)  # compile and capture outside the timing
    times, out = [], None
    for _ in range(reps):
        _sync(eng.device)
        t0 = time.perf_counter()
        out = eng.generate(ids, new)
        _sync(eng.device)
        times.append((time.perf_counter() - t0) * 1e3 / new)
    return statistics.median(times), out[0].tolist()


def parse_points(text: str) -> list[tuple[float, float]]:
    """"0.95:0.5,0.9:0" -> [(0.95, 0.5), (0.9, 0.0)]; a clear error for anything else."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            tau, f = (float(v) for v in item.split(":"))
        except ValueError:
            raise SystemExit(f"--points: {item!r} is not τ:f (e.g. 0.95:0.5)") from None
        if tau <= 0 or not 0 <= f < 1:
            raise SystemExit(f"--points: {item!r} needs τ > 0 and 0 <= f < 1")
        out.append((tau, f))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="an ungated PrunePath checkpoint directory")
    ap.add_argument("--original", required=True, help="the model it was converted from (registry name or path)")
    ap.add_argument("--tau", type=float, default=1.05, help="τ of every row (> 1 with ungated experts: all on)")
    ap.add_argument("--inner", default="0.3,0.4,0.5", help="in-expert fractions to time")
    ap.add_argument("--points", default="",
                    help="extra τ:f rows, e.g. 0.95:0.5,0.9:0.6,0.9:0 (f 0 = expert skipping alone)")
    ap.add_argument("--sparse-ab", action="store_true",
                    help="also time every --points row with the sparse expert kernels forced (sparse_min_bytes 0): "
                         "what the engine's small-layer rule gains or loses there")
    ap.add_argument("--mid-bias", type=float, default=0.15, help="the mid bias the checkpoint was trained with")
    ap.add_argument("--calib-data", default="mix:sotu,moby-dick,austen,brown")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="CPU: Triton interpreter, no graphs")
    ap.add_argument("--out", required=True, help="JSON file to write")
    a = ap.parse_args(argv)

    import prunepath
    from common import machine
    from prunepath.decoding.engine import DecodeEngine
    from prunepath.evaluation.inner import apply_inner, collect_inner_stats, inner_spec
    from prunepath.evaluation.perplexity import evaluate_perplexity
    from prunepath.evaluation.reports import atomic_write_text
    from prunepath.models.arch import max_positions
    if not a.smoke and not torch.cuda.is_available():
        print("decode_checkpoint: no CUDA GPU here (use --smoke with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if a.smoke else "cuda")
    dtype = None if a.smoke else torch.bfloat16
    fractions = [float(f) for f in a.inner.split(",") if f]
    points = parse_points(a.points)
    kw = {"batch": 1, "device": dev, "graphs": not a.smoke}

    orig, tok = prunepath.load_model(a.original, dtype=dtype, device="cpu")
    ids = tok(a.prompt, return_tensors="pt").input_ids.to(dev)
    kw["max_len"] = ids.shape[1] + a.new + 8
    name = prunepath.state_of(orig).display_name or a.original
    base_eng = DecodeEngine(orig.eval(), **kw)
    base, base_tokens = time_engine(base_eng, ids, a.new, a.reps)
    recs = [{"mode": "original", "model": name, "ms_per_token": base, "speedup": 1.0, "tokens": base_tokens}]
    print(f"original {name}: {base:.3f} ms/token")
    ms, _ = time_engine(DecodeEngine(orig.eval(), plain="torch", **kw), ids, a.new, a.reps)
    recs.append({"mode": "original-torch-plain", "ms_per_token": ms, "speedup": base / ms})
    print(f"original, PyTorch plain FFN: {ms:.3f} ms/token ({base / ms:.2f}x)")

    model, _ = prunepath.load_model(a.checkpoint, dtype=dtype, device=str(dev))
    prunepath.configure(model.eval(), tau=a.tau, inner={})
    window = min(512, max_positions(model.config) or 512)  # as `prunepath generate` calibrates
    stats = collect_inner_stats(model, tok, a.calib_data, max_tokens=a.calib_tokens, window=window)
    eng = DecodeEngine(model, **kw)
    forced = DecodeEngine(model, sparse_min_bytes=0, **kw) if a.sparse_ab and points else None
    ms, ref_tokens = time_engine(eng, ids, a.new, a.reps)
    recs.append({"mode": "all-on", "tau": a.tau, "ms_per_token": ms, "speedup": base / ms, "tokens": ref_tokens})
    print(f"checkpoint τ {a.tau}, no thresholds: {ms:.3f} ms/token, {base / ms:.2f}x the original")
    ms, _ = time_engine(DecodeEngine(model, plain="torch", **kw), ids, a.new, a.reps)
    recs.append({"mode": "all-on-torch-plain", "tau": a.tau, "ms_per_token": ms, "speedup": base / ms})
    print(f"checkpoint τ {a.tau}, PyTorch plain FFN: {ms:.3f} ms/token ({base / ms:.2f}x)")
    for f in fractions:
        spec = apply_inner(model, inner_spec(stats, f, mid_bias=a.mid_bias, model=model))
        eng.set_thresholds(spec["t_in"], spec["t_mid"])
        ms, tokens = time_engine(eng, ids, a.new, a.reps)
        same = next((i for i, (x, y) in enumerate(zip(tokens, ref_tokens)) if x != y), len(tokens))
        recs.append({"mode": "thresholds", "tau": a.tau, "inner": f, "mid_bias": a.mid_bias, "ms_per_token": ms,
                     "speedup": base / ms, "tokens": tokens, "tokens_match_all_on": same, "t_in": spec["t_in"],
                     "t_mid": spec["t_mid"]})
        print(f"checkpoint τ {a.tau}, in-expert {f:g}: {ms:.3f} ms/token, {base / ms:.2f}x the original "
              f"(first {same} greedy tokens as all-on)")
    n_layers = len(eng.layers)
    for tau, f in points:
        prunepath.configure(model, tau=tau, inner={})
        eng.set_thresholds([None] * n_layers, [None] * n_layers)
        spec = {"t_in": [None] * n_layers, "t_mid": [None] * n_layers}
        if f > 0:  # calibrated at this τ, as `prunepath generate --tau T --inner-sparsity F` does
            st = collect_inner_stats(model, tok, a.calib_data, max_tokens=a.calib_tokens, window=window)
            spec = apply_inner(model, inner_spec(st, f, mid_bias=a.mid_bias, model=model))
            eng.set_thresholds(spec["t_in"], spec["t_mid"])
        eng.set_tau(tau)
        ms, tokens = time_engine(eng, ids, a.new, a.reps)
        same = next((i for i, (x, y) in enumerate(zip(tokens, ref_tokens)) if x != y), len(tokens))
        # the FFN bytes this point skips on its own decoded text (the PyTorch forward at the same τ and thresholds)
        text = ids[0].tolist() + tokens
        s_ffn = evaluate_perplexity(model, tok, text, window=len(text), progress=False)["s_ffn"]
        recs.append({"mode": "point", "tau": tau, "inner": f, "mid_bias": a.mid_bias, "ms_per_token": ms,
                     "speedup": base / ms, "ffn_path": eng.ffn_mode, "s_ffn": s_ffn, "tokens": tokens,
                     "tokens_match_all_on": same, "t_in": spec["t_in"], "t_mid": spec["t_mid"]})
        print(f"checkpoint τ {tau}, in-expert {f:g}, s_FFN {s_ffn:.2f} ({eng.ffn_mode} path): {ms:.3f} ms/token, "
              f"{base / ms:.2f}x the original (first {same} greedy tokens as all-on)")
        if forced is not None:
            forced.set_thresholds(spec["t_in"], spec["t_mid"])
            forced.set_tau(tau)
            ms_f, tokens_f = time_engine(forced, ids, a.new, a.reps)
            recs.append({"mode": "point-sparse-forced", "tau": tau, "inner": f, "ms_per_token": ms_f,
                         "speedup": base / ms_f, "ffn_path": forced.ffn_mode, "tokens_match_point": tokens_f == tokens,
                         "auto_over_forced": ms_f / ms})
            print(f"  the same, sparse kernels forced ({forced.ffn_mode} path): {ms_f:.3f} ms/token, "
                  f"{base / ms_f:.2f}x the original; auto is {ms_f / ms:.2f}x faster")
    again, _ = time_engine(base_eng, ids, a.new, a.reps)
    recs.append({"mode": "original-again", "ms_per_token": again, "speedup": base / again})
    print(f"original again: {again:.3f} ms/token (drift {again / base - 1:+.1%})")
    payload = {"benchmark": "decode_checkpoint", "machine": machine(), "checkpoint": str(a.checkpoint),
               "original": name, "prompt": a.prompt, "new_tokens": a.new, "reps": a.reps,
               "calib_data": a.calib_data, "calib_tokens": stats.tokens, "records": recs}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {atomic_write_text(out, json.dumps(payload, indent=2) + chr(10))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
