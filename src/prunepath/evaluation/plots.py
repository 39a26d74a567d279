"""Quality/sparsity frontier plots: metric vs s_FFN, one curve per run, dense baselines as horizontal lines."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from prunepath.errors import PrunePathError
from prunepath.evaluation.reports import METRIC_DIRECTION, default_mode, metric_of, read_json, rows_of


def _load(item: Any) -> tuple[str, list[dict], dict | None]:
    """(label, rows, dense row or None) of a result file, a sweep dict, or a list of rows."""
    obj = read_json(item) if isinstance(item, (str, os.PathLike)) else item
    label = None
    dense = None
    if isinstance(obj, dict):
        label = obj.get("label") or obj.get("model")
        dense = obj.get("dense")
    rows = rows_of(obj)
    if not rows:
        raise PrunePathError(f"{item if isinstance(item, (str, os.PathLike)) else 'result'} has no rows to plot")
    if dense is None and all(not r.get("converted", True) for r in rows):
        dense, rows = rows[0], []  # a single dense `prunepath eval` result: draw it as a dense line
    label = label or rows[0].get("label") or rows[0].get("model") if rows else label
    return str(label or "run"), rows, dense


def save_figure(fig, out_png: str | os.PathLike, **savefig_kwargs) -> Path:
    """Write a matplotlib figure atomically (temporary file in the same folder, then rename) and close it."""
    import matplotlib.pyplot as plt

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.", suffix=out.suffix or ".png")
    os.close(fd)
    try:
        fig.savefig(tmp, **savefig_kwargs)
        os.chmod(tmp, default_mode())
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def plot_frontier(result_files_or_rows: Sequence[Any] | Any, out_png: str | os.PathLike, metric: str | None = None,
                  *, title: str | None = None, logy: bool | None = None, labels: Sequence[str] | None = None) -> Path:
    """Plot ``metric`` against s_FFN for each run (a sweep JSON path, a sweep dict, or a list of rows), with each
    run's dense baseline (if recorded) as a dashed line; written atomically to ``out_png``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = result_files_or_rows
    if isinstance(items, (str, os.PathLike, dict)):
        items = [items]
    elif isinstance(items, list) and items and isinstance(items[0], dict) and "rows" not in items[0]:
        items = [items]  # one run given as a list of rows
    runs = [_load(it) for it in items]
    if labels:
        runs = [(lab, rows, dense) for lab, (_, rows, dense) in zip(labels, runs)]
    first = next((r[0] for _, rows, _ in runs for r in [rows] if rows), None) or runs[0][2]
    metric = metric or metric_of(first)
    values = [r.get(metric) for _, rows, d in runs for r in rows + ([d] if d else []) if r.get(metric) is not None]
    if not values:
        raise PrunePathError(f"no {metric!r} values to plot")
    if logy is None:
        logy = metric in ("ppl", "mse") and min(values) > 0 and max(values) / min(values) > 20
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, rows, dense) in enumerate(runs):
        c = colors[i % len(colors)]
        pts = sorted((r["s_ffn"], r[metric], r.get("tau")) for r in rows if r.get(metric) is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=c, label=label, ms=4)
            for x, y, tau in pts:
                if tau is not None:
                    ax.annotate(f"τ={tau:g}", (x, y), textcoords="offset points", xytext=(3, 4), fontsize=6,
                                color=c)
        if dense is not None and dense.get(metric) is not None:
            ax.axhline(dense[metric], color=c, ls="--", lw=1,
                       label=f"dense: {dense.get('model', label)} ({dense[metric]:.4g})")
    if logy:
        ax.set_yscale("log")
    better = METRIC_DIRECTION.get(metric)
    ax.set_xlabel("s_FFN (fraction of FFN weight bytes a token does not read)")
    ax.set_ylabel(f"{metric}" + (f" ({better} is better)" if better else ""))
    ax.set_xlim(left=-0.02)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{metric} vs FFN sparsity", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure(fig, out_png)
