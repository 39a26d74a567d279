"""``prunepath plot``: overlay the frontiers of several sweep results (metric vs s_FFN) in one PNG."""

from __future__ import annotations

import argparse
from prunepath.errors import PrunePathError
from prunepath.evaluation.plots import plot_frontier


def register(sub) -> None:
    p = sub.add_parser("plot", help="plot metric vs s_FFN for one or more sweep/eval result JSON files")
    p.add_argument("results", nargs="+", metavar="RESULT",
                   help="result JSON files from `prunepath eval --json`, or output directories of `prunepath sweep` "
                        "/ `run` (their results.json)")
    p.add_argument("--out", required=True, help="output PNG file (written atomically; the one command whose --out "
                                                "is a file, since it writes one image)")
    p.add_argument("--metric", default=None, help="metric to plot (default: the task's headline metric)")
    p.add_argument("--labels", default=None, help="comma-separated curve labels, one per RESULT")
    p.add_argument("--title", default=None)
    p.add_argument("--logy", action="store_true", default=None, help="log-scale y axis")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    labels = args.labels.split(",") if args.labels else None
    if labels and len(labels) != len(args.results):
        raise PrunePathError(f"--labels has {len(labels)} names for {len(args.results)} result files")
    out = plot_frontier(args.results, args.out, args.metric, title=args.title, logy=args.logy, labels=labels)
    print(f"wrote {out}")
    return 0
