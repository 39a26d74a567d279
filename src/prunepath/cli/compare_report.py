"""``prunepath compare-report``: tables (markdown to stdout) and plot of ``prunepath compare`` /
``compare-trained`` results (API: :func:`prunepath.pipeline.compare_report.compare_report`)."""

from __future__ import annotations

import argparse

from prunepath.pipeline import compare_report


def register(sub) -> None:
    p = sub.add_parser("compare-report", help="tables and plot of `compare` / `compare-trained` result files",
                       description=compare_report.__doc__.split("\n\n")[0])
    p.add_argument("routers")
    p.add_argument("trained", nargs="?")
    p.add_argument("--png", default=compare_report.DEFAULT_PNG)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sections, png = compare_report.compare_report(args.routers, args.trained, args.png)
    for section in sections:
        print(section)
    print(f"plot: {png}")
    return 0
