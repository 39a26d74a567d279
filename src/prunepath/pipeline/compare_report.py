"""Plot and table of the side-by-side runs (``compare`` and ``compare_trained`` JSON files).

    prunepath compare-report docs/results/baselines-smollm2-135m-routers.json \\
        docs/results/baselines-smollm2-135m-trained.json --png docs/results/baselines-smollm2-135m.png
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from prunepath.evaluation.plots import save_figure


def series(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by method label (LTE keeps one series per η), each sorted by s_FFN."""
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        label = re.sub(r"@.*$", "", r["key"])
        out[label].append(r)
    return {k: sorted(v, key=lambda r: r["s_ffn"]) for k, v in out.items()}


def plot(panels: list[tuple[str, list[dict]]], png: Path, ymax: float = 1e5) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), dpi=110, squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels):
        dense = [r for r in rows if r["method"] in ("dense", "dense-ft")]
        for label, pts in series([r for r in rows if r not in dense]).items():
            style = "--" if label.startswith("lte") else "-"
            marker = {"prunepath": "o", "wanda": "x", "static": "s", "moefication": "^", "d2dmoe": "v"}.get(label, ".")
            lw = 2.5 if label == "prunepath" else 1.3
            ax.plot([p["s_ffn"] for p in pts], [min(p["ppl"], ymax) for p in pts], style, marker=marker,
                    label=label, linewidth=lw)
        for d in dense:
            ax.axhline(d["ppl"], color="gray", linestyle=":", label=f"{d['key']} ({d['ppl']:.1f})")
        ax.set_yscale("log")
        ax.set_xlim(0, 1)
        ax.set_xlabel("s_FFN (fraction of FFN experts / weights off)")
        ax.set_ylabel(f"WikiText-2 val PPL (clipped at {ymax:g})")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()

    return save_figure(fig, png)


def table(rows: list[dict], targets=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)) -> str:
    """Markdown: one line per series, PPL at the point nearest each target s_FFN (within 0.05), s in brackets."""
    head = "| method | " + " | ".join(f"s≈{t}" for t in targets) + " |\n|---|" + "---|" * len(targets) + "\n"
    lines = []
    for label, pts in series(rows).items():
        cells = []
        for t in targets:
            near = min(pts, key=lambda p: abs(p["s_ffn"] - t))
            cells.append(f"{near['ppl']:.4g} ({near['s_ffn']:.2f})" if abs(near["s_ffn"] - t) <= 0.05 else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


DEFAULT_PNG = "docs/results/baselines-smollm2-135m.png"


def compare_report(routers: str | Path, trained: str | Path | None = None,
                   png: str | Path = DEFAULT_PNG) -> tuple[list[str], Path]:
    """Tables and plot of a ``compare`` results file (``routers``: frozen backbone) and optionally a
    ``compare_trained`` one (``trained``). Returns (markdown sections, one per panel; the PNG written)."""
    r = json.loads(Path(routers).read_text())
    panels = [("frozen backbone, routers fitted on the same 65,536 calibration tokens", r["rows"])]
    sections = ["### Frozen backbone\n\n" + table(r["rows"])]
    if trained:
        t = json.loads(Path(trained).read_text())
        dense = [x for x in r["rows"] if x["method"] == "dense"]
        panels.append((f"trained (backbone + router), {t['meta']['training']['tokens']:,} tokens each", dense + t["rows"]))
        sections.append("### Trained\n\n" + table(t["rows"], targets=(0.0, 0.1, 0.3, 0.5, 0.6, 0.7, 0.9)))
    return sections, plot(panels, Path(png))


if __name__ == "__main__":  # the command line moved to `prunepath compare-report` (prunepath.cli.compare_report)
    sys.exit("python -m prunepath.pipeline.compare_report moved: run `prunepath compare-report` (same options)")
