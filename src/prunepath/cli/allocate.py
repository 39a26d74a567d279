"""``prunepath allocate``: per-layer τ for a target s_FFN, calibrated on text, written into a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys

from prunepath.cli.common import add_device_arg
from prunepath.errors import PrunePathError
from prunepath.checkpoint import CONFIG_NAME
from prunepath.checkpoint import read_config
from prunepath.cli.common import resolve_device
from prunepath.data.corpora import corpus_names, is_corpus_name
from prunepath.evaluation.allocation import allocate_layer_tau, apply_allocation
from prunepath.evaluation.common import resolve_data_path
from prunepath.evaluation.reports import write_json
import prunepath

ALLOCATE_CHOICES = ("uniform", "greedy")
DEFAULT_CALIB = "mix:sotu,moby-dick,austen,brown"


def add_allocation_args(p: argparse.ArgumentParser, *, default: str = "uniform") -> None:
    p.add_argument("--allocate", default=default, choices=ALLOCATE_CHOICES,
                   help="how --target-sparsity is reached: uniform (one τ for every layer, bisection) or greedy "
                        "(a τ per layer, lowest measured FFN-output error per unit of s_FFN; docs/evaluation.md)"
                        f" (default {default})")


def check_target(value: float | None, flag: str = "--target-sparsity") -> None:
    if value is not None and not 0 < value < 1:
        raise PrunePathError(f"{flag} must be in (0, 1) (got {value}); e.g. 0.5 for half the experts inactive")


def check_calib_source(calib: str | None) -> None:
    """A calibration source that cannot work is an error before any model is loaded."""
    if calib is None:
        return

    if is_corpus_name(calib):
        corpus_names(calib)  # unknown names raise
    else:
        try:
            path = resolve_data_path(calib)
        except PrunePathError as exc:
            raise PrunePathError(f"calibration data: {exc}; or pass a corpus name such as {DEFAULT_CALIB}") from exc
        if path.stat().st_size == 0:
            raise PrunePathError(f"calibration data {path} is empty; pass a text file with content or a corpus "
                                 f"name such as {DEFAULT_CALIB}")


def register(sub) -> None:
    p = sub.add_parser("allocate", help="per-layer τ for a target s_FFN (calibrated) written into a checkpoint",
                       description="Choose τ per layer so that the checkpoint reaches --target-sparsity on "
                                   "calibration text (greedy: measured FFN-output error per unit of s_FFN; uniform: "
                                   "one τ), and save a copy whose routing carries it (prunepath.load gives the same "
                                   "routing). Works on trained and freshly converted checkpoints.")
    p.add_argument("--model", required=True, help="PrunePath checkpoint directory")
    p.add_argument("--target-sparsity", type=float, required=True, help="global s_FFN to reach, in (0, 1)")
    add_allocation_args(p, default="greedy")
    p.add_argument("--calib-data", default=DEFAULT_CALIB,
                   help=f"calibration text: a file or a registry corpus mix (default {DEFAULT_CALIB}); never the "
                        "evaluation text")
    p.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    p.add_argument("--window", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--tol", type=float, default=0.01, help="accepted |achieved − target| (default 0.01)")
    p.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the allocation (with its table) as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_device_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_target(args.target_sparsity)
    if args.calib_tokens < 1 or args.window < 1 or args.calib_tokens < args.window:
        raise PrunePathError(f"--calib-tokens ({args.calib_tokens}) must be at least one --window ({args.window})")
    if not 0 < args.tol < 1:
        raise PrunePathError(f"--tol must be in (0, 1) (got {args.tol})")
    check_calib_source(args.calib_data)
    from pathlib import Path


    if Path(args.model).expanduser().is_dir() and not (Path(args.model).expanduser() / CONFIG_NAME).exists():
        raise PrunePathError(f"{args.model} is not a PrunePath checkpoint; convert it first (`prunepath convert "
                             "--model NAME --out DIR`) and allocate on that directory")
    read_config(args.model)  # a clear error for anything else that is not a checkpoint

    device = resolve_device(args.device)


    model, tok = prunepath.load(args.model, device=device)
    if tok is None:
        raise PrunePathError(f"{args.model} was saved without a tokenizer; allocation tokenizes calibration text")
    res = allocate_layer_tau(model, tok, args.calib_data, args.target_sparsity, method=args.allocate,
                             max_tokens=args.calib_tokens, window=args.window, tol=args.tol,
                             progress=not args.no_progress)
    apply_allocation(model, res, calibration=args.calib_data)
    out = prunepath.save(model.cpu(), args.out, tokenizer=tok)
    if args.json:
        write_json(args.json, {**res, "calibration": args.calib_data, "source": args.model, "out": str(out)})
    lt = res["layer_tau"]
    print(f"{args.allocate}: s_FFN {res['s_ffn']:.4f} on {res['tokens']} calibration tokens (target "
          f"{res['target']:.3f}{'' if res['within_tol'] else ', NOT within tolerance'}); τ per layer "
          f"{min(lt.values()):.3f}–{max(lt.values()):.3f}; saved {out}", file=sys.stderr)
    print(json.dumps({"out": str(out), "s_ffn": res["s_ffn"], "target": res["target"], "method": res["method"],
                      "tokens": res["tokens"], "within_tol": res["within_tol"],
                      "layer_tau": {str(k): v for k, v in lt.items()}}, indent=2))
    return 0
