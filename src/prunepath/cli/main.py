"""The ``prunepath`` command: a thin layer over the Python API. Each sub-command lives in its own module
with ``register(subparsers)`` and ``run(args)``."""

from __future__ import annotations

import argparse
import importlib
import sys

from prunepath.errors import PrunePathError
from prunepath import __version__

# Sub-command modules, in the order of the pipeline. A module that fails to import (an optional extra
# missing) is skipped with a note instead of breaking the whole CLI.
COMMAND_MODULES = (
    "prunepath.cli.convert",
    "prunepath.cli.info",
    "prunepath.cli.self_corpus",
    "prunepath.cli.train",
    "prunepath.cli.baseline",
    "prunepath.cli.eval",
    "prunepath.cli.sweep",
    "prunepath.cli.allocate",
    "prunepath.cli.plot",
    "prunepath.cli.generate",
    "prunepath.cli.run",
    "prunepath.cli.nlu_study",
    "prunepath.cli.study_report",
    "prunepath.cli.compare",
    "prunepath.cli.compare_trained",
    "prunepath.cli.compare_report",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunepath",
        description="Make a transformer's FFNs structurally and dynamically sparse (PrunePath), train, evaluate "
                    "and decode them.")
    parser.add_argument("--version", action="version", version=f"prunepath {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PrunePathError as exc:
        print(f"prunepath {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
