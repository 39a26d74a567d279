"""The NLU study's report: a markdown table and a plot of the records (see :mod:`prunepath.pipeline.nlu_study`)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from prunepath.errors import PrunePathError
from prunepath.evaluation.plots import save_figure
from prunepath.pipeline.nlu_config import PRIMARY, TASK_FILES


def _label(rec: dict) -> str:
    m = rec["method"]
    if m in ("prunepath", "prunepath-sweep") and rec.get("variant") == "pretrained":
        return m + " (pretrained clustering)"
    return m


def render_markdown(records: list[dict]) -> str:
    """One markdown table per task: method, variant, knob, s_FFN, the task's metrics."""
    if not records:
        return "(no NLU records)\n"
    lines = []
    model = records[0].get("model", "")
    for task in [t for t in TASK_FILES if any(x["task"] == t for x in records)]:
        rows = [x for x in records if x["task"] == task]
        cols = ["accuracy"] + (["f1"] if task == "mrpc" else []) + (["mcc"] if task == "cola" else [])
        r0 = rows[0]
        lines.append(f"**{task.upper()}** ({model}; dev {r0['eval_examples']} examples, train "
                     f"{r0['train_examples']} examples{' (subsample)' if r0.get('train_subsampled') else ''}, "
                     f"seed {r0['seed']})\n")
        lines.append("| method | variant | knob | steps | s_FFN | " + " | ".join(cols) + " |")
        lines.append("|---|---|---|---:|---:|" + "---:|" * len(cols))
        for x in rows:
            knob = (f"τ={x['tau']:g}" if x.get("tau") is not None else
                    f"δ={x['threshold']:g}" if x.get("threshold") is not None else
                    f"w={x['wanda_sparsity']:g}" if x.get("wanda_sparsity") is not None else "")
            vals = " | ".join(f"{x[c]:.4f}" if x.get(c) is not None else "" for c in cols)
            lines.append(f"| {x['method']} | {x.get('variant') or ''} | {knob} | {x['train_steps']} | "
                         f"{x['s_ffn']:.3f} | {vals} |")
        lines.append("")
    return "\n".join(lines)


def plot_records(records: list[dict], out_png: str | os.PathLike) -> Path:
    """One panel per task: primary metric vs s_FFN per method (dense fine-tuned as a dashed line)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        raise PrunePathError("no NLU records to plot")
    tasks = [t for t in TASK_FILES if any(x["task"] == t for x in records)]
    n = len(tasks)
    cols = min(n, 2)
    rows_ = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5.2 * cols, 3.8 * rows_), squeeze=False)
    styles = {"prunepath-sweep": "o-", "prunepath-sweep (pretrained clustering)": "s--", "lte": "^-",
              "wanda": "v-", "prunepath": "*", "prunepath (pretrained clustering)": "P"}
    for ax, task in zip(axes.flat, tasks):
        recs = [x for x in records if x["task"] == task]
        for x in recs:
            if x["method"] == "dense-finetuned":
                ax.axhline(x["value"], ls=":", color="k", label="dense fine-tuned")
        for label in sorted({_label(x) for x in recs if x["method"] != "dense-finetuned"}):
            pts = sorted((x["s_ffn"], x["value"]) for x in recs if _label(x) == label)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(label, "x-"), label=label, ms=6)
        ax.set_title(f"{task.upper()} (dev)")
        ax.set_xlabel("s_FFN")
        ax.set_ylabel(PRIMARY[task])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(records[0].get("model", ""), fontsize=9)
    fig.tight_layout()

    return save_figure(fig, out_png, dpi=110)


# ---- command line ----------------------------------------------------------------------------------------------------
