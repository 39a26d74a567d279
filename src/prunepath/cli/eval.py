"""``prunepath eval``: one metric on one model (dense, converted or trained) at one routing setting."""

from __future__ import annotations

import argparse
import json
import sys

from prunepath.cli.allocate import add_allocation_args, check_target
from prunepath.cli.common import (add_device_arg, add_inner_args, add_model_arg, apply_inner_args, check_data_arg,
                                  check_inner_args, check_min, check_model_arg, resolve_device)
from prunepath.errors import PrunePathError
from prunepath.cli.common import TAU_HELP, check_tau
from prunepath.data.corpora import corpus_names, is_corpus_name
from prunepath.evaluation.allocation import allocate_layer_tau
from prunepath.evaluation.allocation import apply_allocation
from prunepath.evaluation.allocation import calibration_ids
from prunepath.evaluation.calibration import find_tau_for_sparsity
from prunepath.evaluation.common import check_tokenizer
from prunepath.evaluation.reports import run_meta, write_json
from prunepath.evaluation.tasks import run_task
from prunepath.state import state_of
import prunepath

GLUE_TASKS = ("sst2", "mrpc", "rte", "cola")
TASKS = ("ppl", "classify", *GLUE_TASKS, "rouge", "recon", "lm-eval")


def add_metric_args(p: argparse.ArgumentParser) -> None:
    """Options shared by ``eval`` and ``sweep``."""
    p.add_argument("--task", required=True, choices=TASKS,
                   help="ppl (raw text), classify|sst2|mrpc|rte|cola (GLUE-style TSV; classify infers the task "
                        "from the path), rouge (XSum-style JSONL), recon (top-k reconstruction MSE), lm-eval "
                        "(lm-evaluation-harness tasks, see --lm-eval-tasks)")
    p.add_argument("--data", default=None,
                   help="data file: a path, or relative to a data folder ($PRUNEPATH_DATA, then the data shipped with "
                        "PrunePath: wikitext-2/wiki.valid.raw)")
    p.add_argument("--tokenizer", default=None, help="tokenizer to use instead of the model's own")
    p.add_argument("--window", type=int, default=512, help="ppl/recon: tokens per window (default 512)")
    p.add_argument("--stride", type=int, default=None, help="ppl: window step (default = window, no overlap)")
    p.add_argument("--max-tokens", type=int, default=None, help="ppl/recon: only the first N tokens of the file")
    p.add_argument("--batch-size", type=int, default=None, help="windows / examples per forward")
    p.add_argument("--limit", type=int, default=None, help="classify/rouge/lm-eval: first N examples only")
    p.add_argument("--max-length", type=int, default=256, help="classify: truncate inputs to N tokens")
    p.add_argument("--max-new-tokens", type=int, default=64, help="rouge: tokens generated per example")
    p.add_argument("--num-beams", type=int, default=1, help="rouge: beam width (1 = greedy)")
    p.add_argument("--ks", default=None, help="recon: comma-separated k values (default 1,2,4,...,E)")
    p.add_argument("--lm-eval-tasks", default=None, help="lm-eval: comma-separated task names (e.g. mmlu,hellaswag)")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples (e.g. 5 for MMLU)")
    p.add_argument("--include-path", default=None, help="lm-eval: folder with extra task YAMLs")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="weights/activations dtype (default fp32). bf16 is ~1.8x faster on CPUs with avx512_bf16 "
                        "or AMX and on GPUs; SmolLM2-135M WikiText-2 PPL moves by ~0.1%% (docs/evaluation.md)")
    r = p.add_argument_group("routing (converted models; defaults: as stored in the checkpoint)")
    r.add_argument("--rule", default=None, choices=["cumulative", "nucleus", "topk", "all"],
                   help="selection rule (the paper's is cumulative)")
    r.add_argument("--k", type=int, default=None, help="experts per token for --rule topk")
    r.add_argument("--gates", default=None, choices=["on", "off"],
                   help="scale experts by sigmoid gates (on) or sum them unscaled (off)")
    r.add_argument("--gate-offset", type=float, default=None, help="added to the logit inside the sigmoid gate")


def apply_routing_args(model, args: argparse.Namespace) -> dict:
    """Apply --rule/--k/--gates/--gate-offset to a converted model; returns what was changed."""

    changes = {k: v for k, v in dict(rule=args.rule, k=args.k, gate_offset=args.gate_offset,
                                     gates=None if args.gates is None else args.gates == "on").items()
               if v is not None}
    if changes:
        if not prunepath.is_converted(model):
            raise PrunePathError("--rule/--k/--gates/--gate-offset need a converted model; this one is dense")
        prunepath.configure(model, **changes)
    return changes


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: perplexity, GLUE accuracy, ROUGE, lm-eval, top-k MSE",
                       description="Evaluate a dense, converted or trained model at one τ and report the metric "
                                   "with s_FFN measured on the same tokens. See docs/evaluation.md.")
    add_model_arg(p)
    add_metric_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tau", type=float, default=None, help=f"{TAU_HELP}; default: the checkpoint's")
    g.add_argument("--target-sparsity", type=float, default=None,
                   help="find the τ giving this s_FFN on calibration text (bisection), report and use it; with "
                        "--allocate greedy, one τ per layer")
    p.add_argument("--calib-data", default=None,
                   help="calibration text for --target-sparsity (default: the first --calib-tokens of --data if "
                        "it is raw text, else WikiText-2 validation)")
    p.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    add_inner_args(p)
    add_allocation_args(p)
    p.add_argument("--json", default=None, metavar="OUT", help="write the result as JSON (atomically)")
    add_device_arg(p)
    p.set_defaults(func=run)


def load_for_eval(args: argparse.Namespace):
    """(model, tokenizer) for the CLI task, with a classification head for GLUE tasks on encoders."""

    device = resolve_device(args.device)
    task = "auto"
    model, tok = prunepath.load_model(args.model, dtype=getattr(args, "dtype", None), task=task, device=device)
    if args.tokenizer:
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(args.tokenizer)
        except OSError:
            _, tok = prunepath.load_model(args.tokenizer)
    check_tokenizer(model, tok)
    return model, tok


def metric_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of the task's Python function, from the CLI options."""
    progress = not args.no_progress
    t = args.task
    if t == "ppl":
        kw = dict(window=args.window, stride=args.stride, max_tokens=args.max_tokens, progress=progress)
        if args.batch_size:
            kw["batch_size"] = args.batch_size
        return kw
    if t in ("classify", *GLUE_TASKS):
        kw = dict(limit=args.limit, max_length=args.max_length,
                  progress=progress)
        if args.batch_size:
            kw["batch_size"] = args.batch_size
        return kw
    if t == "rouge":
        return dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, limit=args.limit,
                    progress=progress)
    if t == "recon":
        ks = None
        if args.ks:
            try:
                ks = [int(k) for k in args.ks.split(",") if k.strip()]
            except ValueError as exc:
                raise PrunePathError(f"--ks must be comma-separated integers (got {args.ks!r})") from exc
        return dict(ks=ks, window=args.window, max_tokens=args.max_tokens or 2048, progress=progress)
    if t == "lm-eval":
        if not args.lm_eval_tasks:
            raise PrunePathError("--task lm-eval needs --lm-eval-tasks (e.g. --lm-eval-tasks mmlu --num-fewshot 5)")
        return dict(tasks=[s for s in args.lm_eval_tasks.split(",") if s], num_fewshot=args.num_fewshot,
                    limit=args.limit, include_path=args.include_path, batch_size=args.batch_size or 8)
    raise PrunePathError(f"unknown task {t!r}")


def needs_data(task: str) -> bool:
    return task != "lm-eval"


def check_metric_args(args: argparse.Namespace) -> None:
    """Every option of ``eval`` / ``sweep`` that can be checked without the model, checked before it loads."""
    import math

    check_model_arg(args.model)
    check_model_arg(args.tokenizer, "--tokenizer")
    if needs_data(args.task) and not args.data:
        raise PrunePathError(f"--task {args.task} needs --data FILE")
    if needs_data(args.task):
        check_data_arg(args.data)
    check_min(args, 1, "window", "batch_size", "limit", "max_length", "max_new_tokens", "num_beams", "k")
    check_min(args, 2, "max_tokens", "calib_tokens")
    check_min(args, 0, "num_fewshot")
    if args.stride is not None and not 1 <= args.stride <= args.window:
        raise PrunePathError(f"--stride must be between 1 and --window ({args.window}); got {args.stride}")
    if args.gate_offset is not None and not math.isfinite(args.gate_offset):
        raise PrunePathError(f"--gate-offset must be a finite number (got {args.gate_offset})")
    if getattr(args, "calib_data", None):
        if is_corpus_name(args.calib_data):  # a registry corpus mix, e.g. mix:sotu,moby-dick,austen,brown
            corpus_names(args.calib_data)
        else:
            check_data_arg(args.calib_data, "--calib-data")
    resolve_device(args.device)
    kw = metric_kwargs(args)  # parses --ks / --lm-eval-tasks
    if any(k < 1 for k in kw.get("ks") or []):
        raise PrunePathError(f"--ks must be positive integers (got {args.ks!r})")


def calibrate(model, tok, args: argparse.Namespace) -> dict:
    calib = args.calib_data
    if calib is None:
        calib = args.data if args.task in ("ppl", "recon") else "wikitext-2/wiki.valid.raw"

    if isinstance(calib, str) and is_corpus_name(calib):  # e.g. mix:sotu,moby-dick,austen,brown
        calib = calibration_ids(tok, calib, args.calib_tokens)
    if getattr(args, "allocate", "uniform") == "greedy":
        return allocate_layer_tau(model, tok, calib, args.target_sparsity, method="greedy",
                                  max_tokens=args.calib_tokens, window=args.window, progress=not args.no_progress)
    return find_tau_for_sparsity(model, tok, calib, args.target_sparsity, max_tokens=args.calib_tokens,
                                 window=args.window, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:


    check_metric_args(args)
    check_tau(args.tau)
    if args.target_sparsity is not None and not 0 <= args.target_sparsity < 1:
        raise PrunePathError(f"--target-sparsity must be in [0, 1) (got {args.target_sparsity})")
    if args.allocate != "uniform":
        if args.target_sparsity is None:
            raise PrunePathError(f"--allocate {args.allocate} needs --target-sparsity S")
        check_target(args.target_sparsity)
    check_inner_args(args)
    model, tok = load_for_eval(args)
    converted = prunepath.is_converted(model)
    if (args.tau is not None or args.target_sparsity is not None or args.inner_sparsity is not None) \
            and not converted:
        raise PrunePathError("--tau / --target-sparsity / --inner-sparsity need a converted model (a PrunePath "
                             "checkpoint from `prunepath convert` or `prunepath train`); this one is dense (for "
                             "activation sparsity on a dense model: prunepath baseline --method teal)")
    apply_routing_args(model, args)
    inner = apply_inner_args(model, tok, args, window=args.window)
    if converted and (args.tau is not None or args.target_sparsity is not None) and \
            state_of(model).config.routing.allocation:
        print("note: --tau / --target-sparsity replace the per-layer τ allocation stored in this checkpoint",
              file=sys.stderr)
        prunepath.configure(model, layer_tau={}, allocation={})
    calib = None
    if args.target_sparsity is not None and args.allocate == "greedy":
        calib = calibrate(model, tok, args)
        lt = calib["layer_tau"]
        print(f"target s_FFN {args.target_sparsity:.3f}: greedy per-layer τ {min(lt.values()):.3f}–"
              f"{max(lt.values()):.3f} gives s_FFN {calib['s_ffn']:.4f} on {calib['tokens']} calibration tokens",
              file=sys.stderr)
        apply_allocation(model, calib, calibration=args.calib_data)
    elif args.target_sparsity is not None:
        calib = calibrate(model, tok, args)
        print(f"target s_FFN {args.target_sparsity:.3f}: τ = {calib['tau']:.4f} gives s_FFN "
              f"{calib['s_ffn']:.4f} on {calib['tokens']} calibration tokens", file=sys.stderr)
        prunepath.configure(model, tau=calib["tau"])
    elif args.tau is not None:
        prunepath.configure(model, tau=args.tau)
    result = run_task(model, tok, args.task, args.data, **metric_kwargs(args))
    if converted:
        result["tau"] = state_of(model).config.routing.tau
        if state_of(model).config.routing.layer_tau:
            result["layer_tau"] = {str(k): v for k, v in state_of(model).config.routing.layer_tau.items()}
    if inner:
        result["inner"] = inner
    if calib is not None:
        result["target_sparsity"] = args.target_sparsity
        result["calibration"] = calib
    result["meta"] = run_meta()
    if args.json:
        write_json(args.json, result)
    summary = {k: v for k, v in result.items() if not isinstance(v, (list, dict))}
    print(json.dumps(summary, indent=2))
    return 0
