"""``prunepath run RECIPE``: the main job — resolve, convert/train, sweep τ, report — from one recipe file."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("run", help="run a recipe end to end (convert/train → τ sweep → table + plot)",
                       description="Run a recipe file (recipes/*.yaml): resolve the model, convert it (and train "
                                   "it if the recipe says so), evaluate the dense reference and a τ sweep, then "
                                   "print a summary and write results.{json,csv,md} and frontier.png. Re-running "
                                   "the same command resumes an interrupted run.")
    p.add_argument("recipe", help="recipe file, e.g. recipes/quickstart.yaml")
    p.add_argument("--out", help="output directory (default: the recipe's out, else runs/NAME)")
    p.add_argument("--model", help="override the recipe's model")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prunepath.pipeline import load_run_recipe, run_recipe

    overrides = {k: v for k, v in (("out", args.out), ("model", args.model)) if v}
    recipe = load_run_recipe(args.recipe, overrides)
    result = run_recipe(recipe, progress=args.progress)
    print()
    print(result["summary"])
    return 0
