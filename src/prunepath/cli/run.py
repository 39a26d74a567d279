"""``prunepath run RECIPE``: the main job — resolve, convert/train, sweep τ, report — from one recipe file.

A recipe with a top-level ``study:`` key runs a study driver instead: ``study: lm`` → :mod:`prunepath.pipeline.lm_study`,
``study: nlu`` → :mod:`prunepath.pipeline.nlu_study`.
"""

from __future__ import annotations

import argparse
import os
import time

from prunepath.cli.common import check_min, check_model_arg, check_out_dir
from prunepath.errors import PrunePathError
from prunepath.pipeline import lm_study
from prunepath.pipeline import load_run_recipe, run_recipe
from prunepath import pipeline
from prunepath.pipeline import nlu_study as _nlu_study  # noqa: F401  (loads it; called as pipeline.nlu_study, which tests can swap)
from prunepath.pipeline.lm_study import parse_shard
from prunepath.pipeline.recipe import read_recipe_mapping


def register(sub) -> None:
    p = sub.add_parser("run", help="run a recipe end to end (convert/train → τ sweep → table + plot)",
                       description="Run a recipe file (recipes/*.yaml): resolve the model, convert it (and train "
                                   "it if the recipe says so), evaluate the dense reference and a τ sweep, then "
                                   "print a summary and write results.{json,csv,md} and frontier.png. Re-running "
                                   "the same command resumes an interrupted run. Recipes with `study: lm` / "
                                   "`study: nlu` run the whole study (resumable, shardable over GPUs).")
    p.add_argument("recipe", help="recipe file, e.g. recipes/quickstart.yaml")
    p.add_argument("--out", help="output directory (default: the recipe's out, else runs/NAME)")
    p.add_argument("--model", help="override the recipe's model")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    g = p.add_argument_group("studies (recipes with `study:`)")
    g.add_argument("--device", help="auto | cpu | cuda (study recipes; default: the recipe's, else auto)")
    g.add_argument("--deadline-s", type=float, default=None,
                   help="stop cleanly (checkpointed) this many seconds from now; env PRUNEPATH_DEADLINE (epoch "
                        "seconds) also works")
    g.add_argument("--train-tokens", type=int, default=None, help="token budget per trained method (lm study)")
    g.add_argument("--shard", default=None, help="i/n: run the i-th of n disjoint parts of the study (lm study)")
    g.add_argument("--jobs", default=None,
                   help="comma-separated job ids or wildcards to run, e.g. 'teal*,cats,train-self*' (lm study; "
                        "default: the recipe's `jobs`, else every job)")
    g.add_argument("--merge-only", action="store_true", help="only gather finished jobs into OUT/results (lm study)")
    g.add_argument("--no-merge", dest="merge", action="store_false", help="skip the merge after running (lm study)")
    p.set_defaults(func=run)


def _deadline(args: argparse.Namespace) -> float | None:
    if args.deadline_s is not None:
        return time.time() + float(args.deadline_s)
    env = os.environ.get("PRUNEPATH_DEADLINE")
    return float(env) if env else None


def run(args: argparse.Namespace) -> int:


    check_model_arg(args.model)  # every option, before any model loads
    check_out_dir(args.out)
    check_min(args, 1, "train_tokens")
    if args.deadline_s is not None and not args.deadline_s > 0:
        raise PrunePathError(f"--deadline-s must be > 0 seconds (got {args.deadline_s:g})")
    if args.shard:
        parse_shard(args.shard)
    raw = read_recipe_mapping(args.recipe)
    study = raw.get("study")
    if study is not None:
        raw = {**raw, **{k: v for k, v in (("out", args.out), ("model", args.model)) if v}}
        raw.setdefault("name", os.path.splitext(os.path.basename(args.recipe))[0])
        raw["source"] = str(args.recipe)
        if study == "lm":
            result = lm_study.run(raw, progress=args.progress, deadline=_deadline(args), device=args.device,
                                  shard=args.shard, train_tokens=args.train_tokens, merge_only=args.merge_only,
                                  do_merge=args.merge,
                                  jobs=[j.strip() for j in args.jobs.split(",") if j.strip()] if args.jobs else None)
        elif study == "nlu":
            if args.device:
                raw["device"] = args.device
            result = pipeline.nlu_study.run(raw, progress=args.progress, deadline=_deadline(args))
        else:
            raise PrunePathError(f"{args.recipe}: unknown study {study!r}; known: lm, nlu")
        print()
        print(result.get("summary", result) if isinstance(result, dict) else result)
        return 0
    overrides = {k: v for k, v in (("out", args.out), ("model", args.model)) if v}
    recipe = load_run_recipe(args.recipe, overrides)
    result = run_recipe(recipe, progress=args.progress)
    print()
    print(result["summary"])
    return 0
