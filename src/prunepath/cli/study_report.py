"""``prunepath study-report``: tables, result files and the frontier plot of the LM study from its merged
results (API: :func:`prunepath.pipeline.study_report.build`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from prunepath.pipeline import study_report


def register(sub) -> None:
    p = sub.add_parser("study-report", help="tables and frontier plot of the LM study from its merged results",
                       description=study_report.__doc__.split("\n\n")[0])
    p.add_argument("results", help="the study's merged results folder (OUT/results) or the files fetched from it")
    p.add_argument("--tag", default="smollm2")
    p.add_argument("--docs", default="docs")
    p.add_argument("--img", default="docs/img")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for k, v in study_report.build(Path(args.results), args.tag, Path(args.docs), Path(args.img)).items():
        print(f"{k}: {v}")
    return 0
