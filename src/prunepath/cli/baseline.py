"""``prunepath baseline``: build a baseline checkpoint on the same experts (MoEfication top-k, D2DMoE, static
expert pruning, Wanda), or TEAL / CATS activation sparsity on the original model, for the same `eval` / `sweep` /
`plot` commands. LTE is trained with ``prunepath train --method lte``."""

from __future__ import annotations

import argparse
import sys

from prunepath.cli.common import add_model_arg
from prunepath.baselines import apply_wanda, fit_router, prune_experts
from prunepath.baselines.activation import check_target, collect_activation_stats, save_activation_model, thresholds_for
from prunepath.checkpoint import atomic_replace_dir
from prunepath.cli.common import check_baseline_args
from prunepath.data.text import load_texts
from prunepath.errors import PrunePathError
from prunepath.state import state_of
import prunepath

FITTED = ("moefication", "d2dmoe")
D2DMOE_THRESHOLD = 0.5  # the default of --threshold (formerly --tau)


def register(sub) -> None:
    p = sub.add_parser(
        "baseline", help="build a baseline checkpoint (moefication, d2dmoe, static, wanda, teal, cats)",
        description="Convert the model (same clustering as PrunePath), then fit a baseline router with the "
                    "backbone frozen (moefication, d2dmoe) or prune on calibration text (static experts, Wanda), "
                    "and save a checkpoint that `prunepath eval` / `sweep` evaluate like any other. TEAL / CATS "
                    "calibrate activation thresholds on the original model (not converted) and save it with them. "
                    "Train LTE with `prunepath train --method lte`.")
    add_model_arg(p)
    p.add_argument("--method", required=True, choices=["moefication", "d2dmoe", "static", "wanda", "teal", "cats"],
                   help="teal / cats: activation sparsity on the original dense model (no conversion)")
    p.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
    p.add_argument("--calib-data", default="mix:sotu,moby-dick,austen,brown",
                   help="calibration text: a corpus name, mix, or a text/JSON(L) file (default: the registry mix; "
                        "never the evaluation text)")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--calib-seq-len", type=int, default=512, help="teal / cats: calibration window length")
    p.add_argument("--sparsity", type=float, help="static / wanda: fraction of experts / weights to drop; teal / "
                                                  "cats: target s_FFN (fraction of FFN weight bytes not read)")
    p.add_argument("--allocate", choices=["uniform", "block", "greedy"], default="uniform",
                   help="teal: the same sparsity for x and h in every layer (uniform); every layer at the target, "
                        "split between x and h by TEAL's block-wise greedy (block); or greedy across layers too")
    p.add_argument("--k", type=int, help="moefication: experts per token stored in the checkpoint (default E/2)")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"d2dmoe: keep experts with predicted norm >= (1 - threshold)·max (default "
                        f"{D2DMOE_THRESHOLD}; stored as the checkpoint's routing τ, which `sweep --taus` then varies)")
    p.add_argument("--tau", type=float, default=None, help="deprecated: d2dmoe's --threshold")
    p.add_argument("--fit-steps", type=int, default=300, help="router fitting steps per layer (moefication, d2dmoe)")
    p.add_argument("--neurons-per-expert", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)


def d2dmoe_threshold(args: argparse.Namespace) -> float:
    """D2DMoE's threshold: ``--threshold``, or the deprecated ``--tau`` (which PrunePath's commands use for the
    routing budget) with a warning, or the default."""
    if args.tau is not None:
        if args.threshold is not None and args.threshold != args.tau:
            raise PrunePathError(f"--tau {args.tau:g} and --threshold {args.threshold:g} disagree; "
                                 "give --threshold only")
        print("warning: `prunepath baseline --tau` is deprecated; D2DMoE's threshold is --threshold", file=sys.stderr)
        return args.tau
    return D2DMOE_THRESHOLD if args.threshold is None else args.threshold


def run(args: argparse.Namespace) -> int:
    import json
    import shutil
    import tempfile
    from pathlib import Path


    if args.method in ("static", "wanda", "teal", "cats") and args.sparsity is None:
        raise PrunePathError(f"--method {args.method} needs --sparsity (e.g. 0.5)")

    check_baseline_args(args)  # every generic option, before the model loads
    threshold = d2dmoe_threshold(args) if args.method == "d2dmoe" else None
    if args.method in ("teal", "cats"):
        return _run_activation(args)
    model, tok = prunepath.load_model(args.model)
    if tok is None:
        raise PrunePathError(f"{args.model} has no tokenizer; calibration needs one")
    texts = load_texts(args.calib_data, "train", seed=args.seed)
    if not texts:
        raise PrunePathError(f"no calibration text in {args.calib_data}")
    if args.method == "wanda":
        info = apply_wanda(model, tok, texts, args.sparsity, max_tokens=args.calib_tokens, progress=args.progress)
        if prunepath.is_converted(model):
            prunepath.save(model, args.out, tokenizer=tok, extra={"static_sparsity": info["sparsity"]})
        else:  # a dense pruned model: a plain save_pretrained directory plus its weight sparsity
            final = Path(args.out).expanduser().resolve()
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists() and any(final.iterdir()):
                raise PrunePathError(f"{final} exists and is not empty; choose another --out")
            staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
            try:
                model.save_pretrained(staging)
                tok.save_pretrained(staging)
                (staging / "prunepath_static.json").write_text(json.dumps(
                    {"method": "wanda", "weight_sparsity": info["sparsity"], "scope": "ffn"}) + "\n")
                atomic_replace_dir(staging, final)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
        print(f"saved {args.out}: Wanda, FFN weight sparsity {info['sparsity']:.3f}")
        return 0
    if not prunepath.is_converted(model):
        prunepath.moefy(model, neurons_per_expert=args.neurons_per_expert, seed=args.seed, progress=args.progress)
    if args.method == "static":
        prune_experts(model, tok, texts, args.sparsity, max_tokens=args.calib_tokens, progress=args.progress)
        what = f"static pruning of {args.sparsity:.0%} of the experts per layer"
    else:
        fit_router(model, tok, texts, method=args.method, steps=args.fit_steps, max_tokens=args.calib_tokens,
                   seed=args.seed, progress=args.progress)
        e = state_of(model).config.num_experts
        if args.method == "moefication":
            prunepath.configure(model, k=args.k or max(1, e // 2))  # fit_router switched the method
            what = f"MoEfication router, top-{args.k or max(1, e // 2)}"
        else:
            prunepath.configure(model, tau=threshold)
            what = f"D2DMoE router, τ {threshold}"
    out = prunepath.save(model, args.out, tokenizer=tok)
    print(f"saved {out}: {what}")
    return 0


def _run_activation(args: argparse.Namespace) -> int:
    """TEAL / CATS: calibrate thresholds on the original dense model and save it with them."""
    from pathlib import Path


    allocation = args.allocate if args.method == "teal" else "uniform"
    check_target(args.method, args.sparsity, allocation)
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrunePathError(f"{out} exists and is not empty; choose another --out")
    if args.calib_tokens < args.calib_seq_len:
        raise PrunePathError(f"--calib-tokens {args.calib_tokens} is shorter than one window (--calib-seq-len "
                             f"{args.calib_seq_len}); raise it")
    model, tok = prunepath.load_model(args.model)
    if prunepath.is_converted(model):
        raise PrunePathError(f"{args.model} is a converted checkpoint; TEAL / CATS run on the original dense model "
                             "(pass the model it was converted from)")
    if tok is None:
        raise PrunePathError(f"{args.model} has no tokenizer; calibration needs one")
    texts = load_texts(args.calib_data, "train", seed=args.seed)
    stats = collect_activation_stats(model, tok, texts, max_tokens=args.calib_tokens, seq_len=args.calib_seq_len,
                                     progress=args.progress)
    spec = thresholds_for(stats, args.method, args.sparsity, allocation)
    spec.calibration["data"] = args.calib_data
    saved = save_activation_model(model, tok, out, spec)
    print(f"saved {saved}: {spec.label()}, thresholds calibrated on {stats.tokens} tokens of {args.calib_data}")
    return 0
