"""Writing results atomically (temp name in the same folder, renamed when complete): JSON, CSV, markdown."""

from __future__ import annotations

import csv
import io
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from prunepath.errors import PrunePathError
from prunepath.io import atomic_write_text, default_mode, _clean, write_json, read_json  # noqa: F401  (re-exported)
from prunepath.evaluation.common import machine_info

# Columns shown in CSV / markdown tables (when present), in this order; per-layer lists stay in the JSON only.
TABLE_COLUMNS = ("tau", "target_sparsity", "s_ffn", "mean_active", "ppl", "nll", "accuracy", "f1", "mcc",
                 "rouge1", "rouge2", "rougeL", "tokens", "examples", "window", "stride")
METRIC_DIRECTION = {"ppl": "lower", "nll": "lower", "accuracy": "higher", "f1": "higher", "mcc": "higher",
                    "rouge1": "higher", "rouge2": "higher", "rougeL": "higher"}


def table_columns(rows: list[dict]) -> list[str]:
    present = [c for c in TABLE_COLUMNS if any(c in r and r[c] is not None for r in rows)]
    return present


def rows_to_csv(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or table_columns(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c) for c in columns})
    return buf.getvalue()


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str] | None = None) -> Path:
    return atomic_write_text(path, rows_to_csv(rows, columns))


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        return f"{v:.4g}" if a >= 100 or a == 0 else f"{v:.4f}" if a < 1 else f"{v:.3f}"
    return str(v)


def rows_to_markdown(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or table_columns(rows)
    head = "| " + " | ".join("s_FFN" if c == "s_ffn" else "τ" if c == "tau" else c for c in columns) + " |"
    sep = "|" + "|".join("---:" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def write_markdown(path: str | os.PathLike, rows: list[dict], title: str | None = None,
                   columns: list[str] | None = None) -> Path:
    text = (f"### {title}\n\n" if title else "") + rows_to_markdown(rows, columns)
    return atomic_write_text(path, text)


def run_meta() -> dict:
    """When and how a result was produced (the command line, UTC time, machine)."""

    import shlex

    argv = ["prunepath", *sys.argv[1:]] if sys.argv and "prunepath" in sys.argv[0] else list(sys.argv)
    return {"command": shlex.join(argv), "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine_info()}


def metric_of(result: dict) -> str:
    """The headline metric name of a result or sweep row."""
    for m in ("ppl", "accuracy", "rougeL", "mse"):
        if m in result:
            return m
    raise PrunePathError("result has no known metric (ppl, accuracy, rougeL)")


def rows_of(obj: Any) -> list[dict]:
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict) and "rows" in obj:
        return obj["rows"]
    if isinstance(obj, dict):
        return [obj]
    raise PrunePathError("unrecognised result file: expected a sweep (with 'rows') or a single result")


def iter_results(paths: Iterable[str | os.PathLike]) -> list[dict]:
    return [read_json(p) for p in paths]
