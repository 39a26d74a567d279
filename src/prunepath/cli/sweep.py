"""``prunepath sweep``: one checkpoint, many τ — results as JSON, CSV, a markdown table and a frontier plot."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prunepath.cli.common import add_device_arg, add_model_arg, check_model_arg, parse_taus
from prunepath.cli.eval import add_metric_args, apply_routing_args, check_metric_args, load_for_eval, metric_kwargs
from prunepath.errors import PrunePathError
from prunepath.evaluation.sweep import activation_sweep
from prunepath.baselines.activation import check_target
from prunepath.data.text import load_texts
from prunepath.evaluation.plots import plot_frontier
from prunepath.evaluation.reports import rows_to_markdown, run_meta, write_csv, write_json, write_markdown
from prunepath.evaluation.sweep import sweep
from prunepath.evaluation.tasks import METRICS, run_task
import prunepath
from prunepath.routing.config import TAU_ALL


def register(sub) -> None:
    p = sub.add_parser("sweep", help="evaluate one converted checkpoint at many τ (quality/sparsity frontier)",
                       description="Evaluate a task at each τ on one checkpoint (data tokenized once) and write "
                                   "OUT/results.json, OUT/results.csv, OUT/results.md and OUT/frontier.png "
                                   "(metric vs s_FFN), the layout of `prunepath run`.")
    add_model_arg(p, required=True)
    add_metric_args(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--taus", default=None, help=f"comma-separated τ values in (0, 2], e.g. 0.3,0.5,0.7,0.9,{TAU_ALL}")
    g.add_argument("--target-sparsities", "--sparsities", default=None,
                   help="comma-separated s_FFN targets in [0, 1); τ is calibrated for each (bisection), or with "
                        "--method teal|cats the activation thresholds (one calibration pass for all)")
    p.add_argument("--method", choices=["prunepath", "teal", "cats"], default="prunepath",
                   help="teal / cats: activation sparsity on a dense model (the original, not converted) at each "
                        "--sparsities target, calibrated on --calib-data (default: the registry mix)")
    p.add_argument("--allocate", choices=["uniform", "greedy"], default="uniform",
                   help="per-layer allocation of each --sparsities target: uniform (one τ / threshold) or greedy "
                        "(PrunePath: a τ per layer, docs/evaluation.md; teal: per-layer thresholds)")
    p.add_argument("--calib-data", default=None, help="calibration text for --target-sparsities "
                                                      "(default: --data for ppl, else WikiText-2 validation)")
    p.add_argument("--calib-tokens", type=int, default=None, help="calibration tokens (default 4096 for τ, 16384 "
                                                                   "for teal / cats)")
    p.add_argument("--dense", default=None, metavar="MODEL",
                   help="also evaluate this dense model (e.g. the one the checkpoint came from) for the dense line")
    p.add_argument("--label", default=None, help="curve label in plots (default: the model name)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory: writes DIR/results.{json,csv,md} and DIR/frontier.png (each atomically)")
    add_device_arg(p)
    p.set_defaults(func=run)


def _floats(text: str, name: str) -> list[float]:
    try:
        vals = [float(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as exc:
        raise PrunePathError(f"{name} must be comma-separated numbers (got {text!r})") from exc
    if not vals:
        raise PrunePathError(f"{name} is empty")
    return vals


OLD_PREFIX_SUFFIXES = (".json", ".csv", ".md", ".png")


def sweep_out_dir(out: str) -> Path:
    """The output directory of ``--out``. The old prefix form (``--out X.json`` → X.json, X.csv, ...) is
    rejected with the new layout named: every command's ``--out`` is a directory now."""
    p = Path(out).expanduser()
    if p.suffix.lower() in OLD_PREFIX_SUFFIXES:
        raise PrunePathError(
            f"--out {out} looks like a file name; --out is a directory now (as for `prunepath run`): the sweep "
            f"writes DIR/results.json, results.csv, results.md and frontier.png. Pass --out {p.with_suffix('')} "
            "(sweeps before this change wrote PREFIX.json/.csv/.md/.png)")
    if p.is_file():
        raise PrunePathError(f"--out {out} is an existing file; --out names a directory (DIR/results.json, ...)")
    return p


def run(args: argparse.Namespace) -> int:
    if args.task == "recon":
        raise PrunePathError("use `prunepath eval --task recon` (it already reports every k)")
    if args.task != "lm-eval" and not args.data:
        raise PrunePathError(f"--task {args.task} needs --data FILE")
    taus = parse_taus(args.taus) if args.taus else None
    targets = _floats(args.target_sparsities, "--target-sparsities") if args.target_sparsities else None
    if targets and any(not 0 <= t < 1 for t in targets):
        raise PrunePathError(f"every target sparsity must be in [0, 1) (got {args.target_sparsities})")
    check_metric_args(args)
    check_model_arg(args.dense, "--dense")
    out_dir = sweep_out_dir(args.out)
    activation = args.method in ("teal", "cats")
    if activation:
        if not targets:
            raise PrunePathError(f"--method {args.method} sweeps target s_FFN values: pass --sparsities 0.3,0.4,0.5")
        for t in targets:
            check_target(args.method, t, args.allocate if args.method == "teal" else "uniform")
    model, tok = load_for_eval(args)
    kw = metric_kwargs(args)
    if activation:
        rows, routing_changes = _activation_rows(args, model, tok, targets, kw), None
    else:
        if not prunepath.is_converted(model):
            raise PrunePathError(f"{args.model} is a dense model; a sweep needs a converted checkpoint "
                                 "(`prunepath convert --model NAME --out DIR`, or a trained one), or "
                                 "--method teal|cats")
        routing_changes = apply_routing_args(model, args)
        rows = sweep(model, tok, args.task, args.data, taus, target_sparsities=targets, calib_data=args.calib_data,
                     calib_tokens=args.calib_tokens or 4096, allocate=args.allocate, **kw)
    dense = None
    if args.dense:
        dmodel, dtok = prunepath.load_model(args.dense, dtype=args.dtype, device=args.device)
        dense = run_task(dmodel, dtok, args.task, args.data, **kw)
        del dmodel
    metric = METRICS.get(args.task, "accuracy")
    if args.task == "lm-eval":
        metric = next((k for k in rows[0] if k.startswith("acc")), "acc")
    label = args.label or rows[0].get("model")
    result = {"kind": "sweep", "label": label, "model": rows[0].get("model"), "source": args.model,
              "task": args.task, "metric": metric, "data": args.data, "routing_overrides": routing_changes,
              "rows": rows, "dense": dense,
              "meta": run_meta()}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", result)
    table_rows = rows + ([{**dense, "tau": None}] if dense else [])
    write_csv(out_dir / "results.csv", table_rows)
    write_markdown(out_dir / "results.md", table_rows, title=f"{label}: {args.task} on {args.data}")
    wrote = "results.json, results.csv, results.md"
    try:
        plot_frontier([result], out_dir / "frontier.png", metric)
        wrote += ", frontier.png"
    except ImportError:
        print("matplotlib is missing: no plot (pip install 'prunepath[eval]')", file=sys.stderr)
    print(rows_to_markdown(table_rows))
    print(f"wrote {out_dir}/: {wrote}", file=sys.stderr)
    return 0


def _activation_rows(args: argparse.Namespace, model, tok, targets: list[float], kw: dict) -> list[dict]:
    """TEAL / CATS at every target: thresholds from one calibration pass on registry text (never --data), in
    windows of the evaluation's length."""

    if prunepath.is_converted(model):
        raise PrunePathError(f"{args.model} is a converted checkpoint; --method {args.method} runs on the original "
                             "dense model (pass the model it was converted from)")
    texts = load_texts(args.calib_data or "mix:sotu,moby-dick,austen,brown", "train")
    return activation_sweep(model, tok, args.task, args.data, args.method, targets, calib_texts=texts,
                            allocation=args.allocate if args.method == "teal" else "uniform",
                            calib_tokens=args.calib_tokens or 16384, seq_len=getattr(args, "window", None) or 512,
                            **kw)
