"""``prunepath nlu-study``: run the NLU study from a recipe (``study: nlu``; ``prunepath run`` dispatches such
recipes too), or render an existing record list (API: :mod:`prunepath.pipeline.nlu_study`)."""

from __future__ import annotations

import argparse
import sys

from prunepath.errors import PrunePathError
from prunepath import pipeline
from prunepath.pipeline import nlu_study as _nlu_study  # noqa: F401  (loads it; called as pipeline.nlu_study, as in cli.run)


def register(sub) -> None:
    p = sub.add_parser("nlu-study", help="run the NLU study from a recipe, or render its records (--report)",
                       description="The NLU study (issue 7, item 2): MiniLM-L6 fine-tuned on SST-2, MRPC, RTE and "
                                   "CoLA; metric vs s_FFN for the dense fine-tuned model, PrunePath, LTE, Wanda and "
                                   "the clustering ablation. Runs the recipe's units in priority order (resumable, "
                                   "optionally against a deadline), or with --report renders an existing record "
                                   "list.")
    p.add_argument("recipe", nargs="?", help="recipe YAML/JSON (study: nlu)")
    p.add_argument("--device", help="override the recipe's device (cpu, cuda)")
    p.add_argument("--out", help="override the recipe's out directory")
    p.add_argument("--display-name", help="override the model name written into the records")
    p.add_argument("--data-dir", help="override the recipe's data_dir (folder with sst2/ mrpc/ rte/ cola/)")
    p.add_argument("--deadline-s", type=float, help="seconds from now after which no unit that does not fit starts")
    p.add_argument("--report", help="render an existing record list (markdown to stdout) instead of running")
    p.add_argument("--plot", help="with --report (or after a run): write the plot here")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    study = pipeline.nlu_study
    if args.report:
        recs = study.read_records(args.report)
        print(study.render_markdown(recs))
        if args.plot:
            print(f"plot: {study.plot_records(recs, args.plot)}", file=sys.stderr)
        return 0
    if not args.recipe:
        raise PrunePathError("give a recipe (or --report RECORDS)")
    res = study.run_recipe_file(args.recipe, device=args.device, out=args.out, display_name=args.display_name,
                                data_dir=args.data_dir, deadline_s=args.deadline_s, progress=args.progress)
    print(res["summary"])
    if args.plot and res["records"]:
        print(f"plot: {study.plot_records(res['records'], args.plot)}")
    return 0
