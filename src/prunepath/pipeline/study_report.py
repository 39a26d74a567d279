"""Tables and the frontier plot of the LM study from its merged results (``prunepath.pipeline.lm_study``).

    prunepath study-report RESULTS_DIR [--tag smollm2] [--docs docs] [--img docs/img]

Reads RESULTS_DIR/lm-TAG.json (+ topk-TAG.json, gen-TAG-raw.json, gen-TAG-predictions.jsonl,
study-TAG-meta.json when present); writes DOCS/results/lm-TAG.json (copy), DOCS/results/gen-TAG.json (ROUGE-L
computed here: rouge-score is not on the GPU machine), DOCS/results/topk-TAG.json, DOCS/results/study-lm-TAG.md
(markdown tables) and IMG/study-lm-TAG.png (PPL vs s_FFN, every method).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import textwrap
from pathlib import Path

from prunepath.evaluation.reports import atomic_write_text, write_json
from prunepath.evaluation.sweep import envelope_at_sparsity, value_at_sparsity
from prunepath.evaluation.generation import rouge_scores
from prunepath.evaluation.plots import save_figure

# Known curves: (method, variant or None, label, style); every other (method, variant) in the results gets a
# curve too, labelled by its variant (see ``curves``).
KNOWN = [
    ("prunepath-sweep", "warmstart+offset", "PrunePath (warm start + gate offset), τ sweep", "o-"),
    ("prunepath-sweep", "paper-defaults", "PrunePath (paper defaults), τ sweep", "o--"),
    ("prunepath-sweep", "warmstart+offset+distill", "PrunePath (+ distillation α 0.8), τ sweep", "o:"),
    ("prunepath-sweep", "warmstart+offset+distill(1.0)", "PrunePath (+ distillation α 1.0), τ sweep", "o:"),
    ("prunepath-sweep", "warmstart+offset+distill+router-distill", "PrunePath (+ distillation α 0.8 + router distill), "
     "τ sweep", "o-."),
    ("prunepath-sweep", "warmstart+offset+distill+router-distill(4)",
     "PrunePath (+ distillation α 0.8 + router distill ×4), τ sweep", "o-."),
    ("prunepath", None, "PrunePath trained to τ_min (at τ_min ± 0.05)", "*"),
    ("teal", None, "TEAL (training-free, uniform)", "P-"),
    ("teal-block", None, "TEAL (training-free, block-wise x/h split)", "P:"),
    ("teal-greedy", None, "TEAL (training-free, greedy allocation)", "P--"),
    ("cats", None, "CATS (training-free)", "X-"),
    ("lte", None, "LTE (trained), δ sweep", "s-"),
    ("moefication-topk", None, "MoEfication top-k", "^-"),
    ("d2dmoe", None, "D2DMoE", "v-"),
    ("wanda", None, "Wanda (weight sparsity)", "x-"),
    ("static", None, "static expert pruning", "d-"),
]
METHOD_ORDER = ["prunepath-inner", "prunepath-alloc", "prunepath-sweep", "prunepath", "teal", "teal-block", "teal-greedy",
                "cats", "lte", "moefication-topk", "d2dmoe", "wanda", "static"]
TARGETS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
# Issue 13's targets, as a ratio to the original model: with every expert on, at s_FFN 0.4 and at 0.5.
GOALS = (("all experts on", None, 1.02), ("s_FFN 0.4", 0.4, 1.10), ("s_FFN 0.5", 0.5, 1.20))
TRAINING_FREE = ("teal", "teal-block", "teal-greedy", "cats")
# methods with one curve per trained variant, named by what was swept
PER_VARIANT = {"prunepath-alloc": "target sweep", "prunepath-inner": "frontier of τ × in-expert fraction"}


def curves(rows: list[dict]) -> list[tuple[str, str | None, str, str]]:
    """Every curve in the results: the known ones first (in their order), then the other variants. A method
    measured on several bases (e.g. Wanda on the original and on the dense fine-tuned model) gets one curve per
    variant."""
    several = {m for m in {r["method"] for r in rows} if len({r.get("variant") for r in rows if r["method"] == m}) > 1}
    out = []
    for m, v, label, style in KNOWN:
        if v is None and m in several and not m.startswith("prunepath"):
            out += [(m, var, f"{label} ({var})", style) for var in
                    dict.fromkeys(r.get("variant") for r in rows if r["method"] == m)]
        elif any(r["method"] == m and (v is None or r.get("variant") == v) for r in rows):
            out.append((m, v, label, style))
    seen = {(m, v) for m, v, _, _ in out}
    split = {m for m, v, _, _ in KNOWN if v is not None}  # methods whose curves are per variant
    styles = iter(["o-", "s-.", "D-", "h--", "p-.", "o--", "s:", "D:", "h-"] * 4)
    covered = {m for m, v, _, _ in out if v is not None and m not in split}
    for method in METHOD_ORDER:
        if method in covered:
            continue
        for v in dict.fromkeys(r.get("variant") for r in rows if r["method"] == method):
            key = (method, v if method in split or method in PER_VARIANT else None)
            if key in seen or (method not in split and method not in PER_VARIANT and (method, None) in seen):
                continue
            seen.add(key)
            what = PER_VARIANT.get(method, "τ sweep")
            label = f"PrunePath ({v}), {what}" if method.startswith("prunepath") else f"{method} ({v})"
            out.append((method, key[1], label, next(styles)))
    return out


def curve(rows: list[dict], method: str, variant: str | None, *, with_router: bool = False) -> list[dict]:
    """The points of one curve sorted by s_FFN; ``with_router`` moves PrunePath points left by the router's
    bytes (:func:`router_share`), so the s axis counts every FFN-side byte a token reads."""
    pts = [r for r in rows if r["method"] == method and (variant is None or r.get("variant") == variant)
           and r.get("ppl") is not None and math.isfinite(r["ppl"])]
    if with_router:
        pts = [{**r, "s_ffn": r["s_ffn"] - router_share(r)} for r in pts]
    return sorted(pts, key=lambda r: r["s_ffn"])


def router_share(r: dict) -> float:
    """The router bytes a record's tokens read, as a share of the FFN bytes: none at τ > 1 when the experts are
    ungated (``gates`` False: nothing scales them, so the router need not run), else ``router_bytes_frac``."""
    if r.get("gates") is False and r.get("tau") is not None and float(r["tau"]) > 1.0:
        return 0.0
    return float(r.get("router_bytes_frac") or 0.0)


def ppl_at(points: list[dict], s: float) -> float | None:
    """PPL at s_FFN ``s`` (log-linear interpolation between measured points; None outside them)."""
    return value_at_sparsity(points, s, "ppl")


def inner_lines(rows: list[dict], variant: str | None, *, with_router: bool = False) -> list[list[dict]]:
    """The one-knob lines of a τ × in-expert-fraction grid: the fraction swept at each (τ, allocation), starting
    from that τ's point without thresholds, and the τ sweep itself."""
    sweep_pts = curve(rows, "prunepath-sweep", variant, with_router=with_router)
    grid = curve(rows, "prunepath-inner-grid", variant, with_router=with_router)
    def line_of(r: dict) -> tuple:
        return r.get("tau"), str(r.get("inner_allocation") or "uniform")

    lines = [sweep_pts] if sweep_pts else []
    for key in sorted({line_of(r) for r in grid}):
        line = [r for r in grid if line_of(r) == key]
        line += [r for r in sweep_pts if r.get("tau") == key[0]]
        lines.append(sorted(line, key=lambda r: r["s_ffn"]))
    return lines


def curve_ppl_at(rows: list[dict], method: str, variant: str | None, s: float, *,
                 with_router: bool = False) -> float | None:
    """PPL of one curve at s_FFN ``s``. A τ × fraction grid (``prunepath-inner``) is read along its lines
    (:func:`inner_lines`, :func:`envelope_at_sparsity`): its Pareto front mixes settings whose s differ by
    calibration noise, and interpolating across them would not be a setting one can run."""
    if method == "prunepath-inner":
        lines = inner_lines(rows, variant, with_router=with_router)
        if any(r.get("method") == "prunepath-inner-grid" for line in lines for r in line):
            return envelope_at_sparsity(lines, s)
    return ppl_at(curve(rows, method, variant, with_router=with_router), s)


def _ref(rows: list[dict], method: str) -> dict | None:
    return next((r for r in rows if r["method"] == method), None)


def _f(v, nd: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _n(v) -> str:
    if isinstance(v, list):
        return " / ".join(_n(x) for x in v) or "?"
    return f"{v:,}" if isinstance(v, int) else "?"


def _cell(v: float | None, orig: float | None, ft: float | None) -> str:
    if v is None:
        return "–"
    ratios = [f"{v / orig:.2f}×" if orig else None, f"{v / ft:.2f}× ft" if ft else None]
    return f"{v:.2f} (" + ", ".join(r for r in ratios if r) + ")" if any(ratios) else f"{v:.2f}"


def frontier_table(rows: list[dict], *, with_router: bool = False) -> str:
    """PPL at fixed s_FFN for every curve, with the ratio to the original model first and to the dense
    fine-tuned model second."""
    orig, ft = _ref(rows, "dense"), _ref(rows, "dense-finetuned")
    o, f = (orig or {}).get("ppl"), (ft or {}).get("ppl")
    head = "| method | all experts on | " + " | ".join(f"s={t:.1f}" for t in TARGETS) + " |"
    lines = [head, "|" + "---|" * (len(TARGETS) + 2)]
    for method, variant, label, _ in curves(rows):
        pts = curve(rows, method, variant, with_router=with_router)
        if not pts or method == "prunepath":
            continue
        on = next((p["ppl"] for p in pts if p.get("tau") is not None and p["tau"] > 1), None)
        cells = [_cell(curve_ppl_at(rows, method, variant, t, with_router=with_router), o, f) for t in TARGETS]
        lines.append(f"| {label} | {_cell(on, o, f)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def records_table(rows: list[dict]) -> str:
    orig, ft = _ref(rows, "dense"), _ref(rows, "dense-finetuned")
    lines = ["| method | variant | knob | s_FFN | router bytes | PPL | × original | × dense-ft | train tokens | "
             "eval tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], str(r.get("variant")), r["s_ffn"])):
        knob = r.get("knob") or ({"tau": r["tau"]} if r.get("tau") is not None else {})
        if r["method"] == "prunepath" and r.get("tau_min") is not None:
            knob = {"tau_min": r["tau_min"], "tau": r["tau"]}
        knob_s = ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in knob.items())
        ro = f"{r['ppl'] / orig['ppl']:.2f}" if orig else "–"
        rf = f"{r['ppl'] / ft['ppl']:.2f}" if ft else "–"
        rb = f"{router_share(r):.4f}" if r.get("router_bytes_frac") is not None else ""  # the bytes read there
        lines.append(f"| {r['method']} | {r.get('variant') or ''} | {knob_s} | {r['s_ffn']:.3f} | {rb} | "
                     f"{r['ppl']:.2f} | {ro} | {rf} | {r.get('train_tokens', 0):,} | {r.get('eval_tokens', 0):,} |")
    return "\n".join(lines)


def _near(points: list[dict], s: float, slack: float = 0.01) -> float | None:
    """PPL at ``s``, or at the measured point within ``slack`` of it when the curve stops just short (a
    training-free sweep's sparsest point often lands at 0.59x for a 0.6 target)."""
    v = ppl_at(points, s)
    if v is None:
        close = [p for p in points if abs(p["s_ffn"] - s) <= slack]
        v = min((p["ppl"] for p in close), default=None)
    return v


def targets_check(rows: list[dict]) -> str:
    """Issue 13's targets for every trained PrunePath setting (τ sweep and per-layer allocation), against the
    ORIGINAL model; and whether each is below TEAL and CATS at s 0.3–0.6 at equal FFN bytes (router counted)."""
    orig = _ref(rows, "dense")
    cands = [c for c in curves(rows) if c[0] in ("prunepath-sweep", *PER_VARIANT)]
    if not orig or not cands:
        return "(no original-model record or PrunePath curve yet)"
    o = orig["ppl"]
    free = {m: curve(rows, m, None) for m in TRAINING_FREE if curve(rows, m, None)}
    names = {"teal": "TEAL", "teal-block": "TEAL-block", "teal-greedy": "TEAL-greedy", "cats": "CATS"}
    vs = ("below the best of " + ", ".join(names[m] for m in free)) if free else "below training-free (none measured)"
    lines = ["| setting | " + " | ".join(f"{g[0]} (≤ {g[2]}×)" for g in GOALS) + f" | {vs} at s 0.3–0.6 "
             "(router counted) |", "|---" * (len(GOALS) + 2) + "|"]
    for method, variant, label, _ in cands:
        pts = curve(rows, method, variant)
        on_pts = curve(rows, "prunepath-sweep", variant)
        cells = []
        for name, s, goal in GOALS:
            if s is None:
                v = next((p["ppl"] for p in on_pts if p.get("tau") is not None and p["tau"] > 1), None)
            else:
                v = curve_ppl_at(rows, method, variant, s)
            cells.append("–" if v is None else f"{v / o:.3f}× {'met' if v / o <= goal else 'missed'}")
        verdict = []
        for s in (0.3, 0.4, 0.5, 0.6):
            mine = curve_ppl_at(rows, method, variant, s, with_router=True)
            theirs = {m: v for m, v in ((m, _near(p, s)) for m, p in free.items()) if v is not None}
            if mine is None or not theirs:
                verdict.append(f"{s}: –")
            else:
                best = min(theirs.values())
                verdict.append(f"{s}: {'yes' if mine < best else 'no'} ({mine / o:.2f}× vs {best / o:.2f}×)")
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + "; ".join(verdict) + " |")
    return "\n".join(lines)


# Curves left out of the plot (the tables keep them): superseded PrunePath settings, LTE (off the scale) and
# the baselines built on the dense fine-tuned model (the original model is the reference).
PLOT_SKIP_VARIANTS = ("warmstart+offset", "paper-defaults", "warmstart+offset+distill",
                      "warmstart+offset+distill(1.0)", "warmstart+offset+distill+router-distill(4)")


def _plotted(rows: list[dict], method: str, variant: str | None) -> bool:
    """Whether a curve goes into the plot: not LTE, not the τ_min stars, not a baseline built only on the dense
    fine-tuned model, and not a superseded PrunePath setting when a newer one is in the results."""
    if method in ("lte", "prunepath"):
        return False
    swept = {r.get("variant") for r in rows if r["method"] == "prunepath-sweep"}
    newer = len(swept) > 3 and any(v not in PLOT_SKIP_VARIANTS for v in swept)  # few curves: plot them all
    if newer and (variant or "") in PLOT_SKIP_VARIANTS:
        return False
    variants = {r.get("variant") or "" for r in rows if r["method"] == method and variant in (None, r.get("variant"))}
    return not all("dense-finetuned" in v for v in variants)


def plot(rows: list[dict], out_png: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # long variant labels wrap instead of running off the figure, and the figure grows to fit its legend
    shown = [(m, v, textwrap.fill(label, 80, subsequent_indent="  "), style)
             for m, v, label, style in curves(rows) if _plotted(rows, m, v)]
    legend_lines = sum(label.count("\n") + 1 for _, _, label, _ in shown) + 2
    height = max(5.4, 0.13 * legend_lines + 0.8)
    fig, ax = plt.subplots(figsize=(11.5, height), dpi=120)
    for method, variant, label, style in shown:
        pts = curve(rows, method, variant)
        pts = [p for p in pts if p["s_ffn"] > 0 or method.startswith("prunepath")]
        if pts:
            ax.plot([p["s_ffn"] for p in pts], [p["ppl"] for p in pts], style, ms=5 if style != "*" else 9,
                    label=label, lw=1.2)
    for method, ls, name in (("dense", "-", "original model"), ("dense-finetuned", "--", "dense fine-tuned")):
        r = _ref(rows, method)
        if r:
            ax.axhline(r["ppl"], color="k", ls=ls, lw=1, label=f"{name} ({r['ppl']:.2f})")
    orig = _ref(rows, "dense")
    if orig:
        ax.set_ylim(top=min(ax.get_ylim()[1], orig["ppl"] * 20), bottom=orig["ppl"] * 0.9)
    ax.set_yscale("log")
    ax.set_xlabel("s_FFN (fraction of FFN weight bytes a token does not read; Wanda: weight sparsity)", fontsize=8.5)
    ax.set_ylabel("WikiText-2 validation PPL (lower is better)")
    ax.set_xlim(-0.02, 0.95)
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.subplots_adjust(left=0.08, right=0.52, top=1 - 0.5 / height, bottom=0.55 / height)

    return save_figure(fig, out_png)


# A chat turn that the model starts on its own, after its answer: with the special tokens skipped it reads as
# "\nuser\n" (ChatML; SmolLM2). Predictions made before generation stopped at every special token run on into it.
NEW_TURN = re.compile(r"\n(?:user|assistant|system)\n")


def cut_at_new_turn(text: str) -> str:
    """``text`` up to a chat turn the model began itself (the answer ends there)."""
    return NEW_TURN.split(text, maxsplit=1)[0].strip()


def rouge_summary(preds: list[dict], raw: dict | None) -> dict:
    """ROUGE-L (and 1/2) per system from the predictions (rouge-score, Porter stemming); also how many ran on into
    a new chat turn, and ROUGE-L with those cut where that turn begins (``rougeL_turn_cut``)."""

    systems: dict[str, list[dict]] = {}
    for p in preds:
        systems.setdefault(p["system"], []).append(p)
    meta = {s["system"]: s for s in ((raw or {}).get("xsum") or {}).get("systems", [])}
    out = []
    for name, ps in systems.items():
        texts, refs = [p["prediction"] for p in ps], [p["reference"] for p in ps]
        sc = rouge_scores(texts, refs)
        cut = [cut_at_new_turn(t) for t in texts]
        m = meta.get(name, {})
        out.append({"system": name, "tau": ps[0].get("tau"), "examples": len(ps), **sc,
                    "new_turn_runs": sum(c != t.strip() for c, t in zip(cut, texts)),
                    "rougeL_turn_cut": rouge_scores(cut, refs)["rougeL"],
                    "s_ffn_decode": m.get("s_ffn_decode"), "s_ffn_prefill": m.get("s_ffn_prefill")})
    return {"xsum": {k: v for k, v in ((raw or {}).get("xsum") or {}).items() if k != "systems"} | {"systems": out},
            "alpaca": (raw or {}).get("alpaca")}


def gen_tables(gen: dict) -> str:
    lines = []
    xs = gen.get("xsum") or {}
    if xs.get("systems"):
        lines += [f"XSum sample ({xs['systems'][0]['examples']} documents, greedy, ≤ {xs.get('max_new_tokens')} new "
                  "tokens):", "", "| system | τ | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-L, cut at a new turn | "
                  "ran into a new turn | decode s_FFN |", "|---|---|---|---|---|---|---|---|"]
        for s in xs["systems"]:
            lines.append(f"| {s['system']} | {_f(s['tau'])} | {100 * s['rouge1']:.1f} | {100 * s['rouge2']:.1f} | "
                         f"{100 * s['rougeL']:.1f} | {100 * s.get('rougeL_turn_cut', s['rougeL']):.1f} | "
                         f"{s.get('new_turn_runs', 0)} | {_f(s.get('s_ffn_decode'), 3)} |")
    al = gen.get("alpaca") or {}
    if al.get("systems"):
        lines += ["", f"Alpaca sample (prompt-masked loss on {al.get('loss_examples')} examples):", "",
                  "| system | τ | loss | PPL | s_FFN |", "|---|---|---|---|---|"]
        for s in al["systems"]:
            lines.append(f"| {s['system']} | {_f(s['tau'])} | {s['loss']:.3f} | {s['ppl']:.2f} | {s['s_ffn']:.3f} |")
        n = len(al["systems"][0].get("generations", []))
        for i in range(n):
            lines += ["", f"Generation {i + 1}: `{al['systems'][0]['generations'][i]['prompt'][-160:].strip()!r}`", ""]
            for s in al["systems"]:
                g = s["generations"][i]["response"].replace("\n", " ").strip()
                lines.append(f"- **{s['system']}**: {g[:400]}")
    return "\n".join(lines)


def topk_table(topk: list[dict]) -> str:
    rows = [t for t in topk if "error" not in t]
    failed = [f"- {t.get('router', '?')}: failed, `{t['error']}`" for t in topk if "error" in t]
    if not rows:
        return "\n".join(["(no top-k reconstruction results)", *failed])
    ks = sorted({t["k"] for t in rows})
    routers = list(dict.fromkeys(t["router"] for t in rows))
    lines = ["| router | " + " | ".join(f"k={k}" for k in ks) + " |", "|" + "---|" * (len(ks) + 1)]
    for r in routers:
        by_k = {t["k"]: t for t in rows if t["router"] == r}
        lines.append(f"| {r} | " + " | ".join(f"{by_k[k]['rel_mse']:.3f}" if k in by_k else "–" for k in ks) + " |")
    return "\n".join(lines + ([""] + failed if failed else []))


def build(results: Path, tag: str, docs: Path, img: Path) -> dict[str, str]:
    """Write the LM study's report from its merged results folder ``results`` (files named with ``tag``):
    result copies and the markdown tables under ``docs``/results, the frontier plot under ``img``. Returns
    {what: path written} (lm, plot, markdown; topk, gen, density when their inputs are there)."""
    rows = json.loads((results / f"lm-{tag}.json").read_text())
    meta_p = results / f"study-{tag}-meta.json"
    meta = json.loads(meta_p.read_text()) if meta_p.exists() else {}
    (docs / "results").mkdir(parents=True, exist_ok=True)
    written = {"lm": str(write_json(docs / "results" / f"lm-{tag}.json", rows))}
    png = plot(rows, img / f"study-lm-{tag}.png",
               f"{rows[0]['model'] if rows else tag}: WikiText-2 validation ({rows[0]['eval_tokens'] if rows else '?'} "
               f"tokens) PPL vs s_FFN")
    written["plot"] = str(png)
    budgets = sorted({int(r.get("train_tokens") or 0) for r in rows} - {0})
    parts = [f"# LM study: {rows[0]['model'] if rows else tag}", "",
             f"Training tokens per trained method: {_n(budgets)} (see each record's `train_tokens` and `variant`); "
             f"evaluation: WikiText-2 validation, "
             f"{rows[0]['eval_tokens'] if rows else '?'} tokens, window {rows[0].get('window') if rows else '?'}.", "",
             f"![frontier]({os.path.relpath(png, docs / 'results')})", "",
             "## PPL at fixed s_FFN (interpolated in log PPL; × the original model, × dense fine-tuned)", "",
             frontier_table(rows), "", "## The same with PrunePath's router bytes counted (s − router bytes)", "",
             frontier_table(rows, with_router=True), "", "## Targets (issue 13, against the original model)", "",
             targets_check(rows), "",
             "## Every measured point", "", records_table(rows)]
    topk_p = results / f"topk-{tag}.json"
    if topk_p.exists():
        topk = json.loads(topk_p.read_text())
        written["topk"] = str(write_json(docs / "results" / f"topk-{tag}.json", topk))
        parts += ["", "## Top-k reconstruction (relative MSE of the FFN output vs all experts, WikiText-2)", "",
                  topk_table(topk)]
    preds_p = results / f"gen-{tag}-predictions.jsonl"
    if preds_p.exists():
        preds = [json.loads(x) for x in preds_p.read_text().splitlines() if x.strip()]
        raw_p = results / f"gen-{tag}-raw.json"
        gen = rouge_summary(preds, json.loads(raw_p.read_text()) if raw_p.exists() else None)
        written["gen"] = str(write_json(docs / "results" / f"gen-{tag}.json", gen))
        parts += ["", "## Generation", "", gen_tables(gen)]
    if meta.get("jobs"):
        parts += ["", "## Time per job (s)", "", "| job | seconds | finished |", "|---|---|---|"]
        parts += [f"| {j['job']} | {j['seconds']} | {j['finished']} |" for j in meta["jobs"]]
        for run, t in (meta.get("training") or {}).items():
            parts.append(f"\ntraining {run}: {t['tokens']:,} tokens, {t['steps']} steps, {t['seconds_total']} s "
                         f"({t['tokens'] / max(t['seconds_total'], 1e-9):,.0f} tok/s)")
        if meta.get("left_jobs"):
            parts += ["", "Not finished: " + ", ".join(meta["left_jobs"])]
    dens = results / f"density-profile-{tag}.json"
    if dens.exists():
        written["density"] = str(shutil.copy(dens, docs / "results" / dens.name))
    md = docs / "results" / f"study-lm-{tag}.md"
    atomic_write_text(md, "\n".join(parts) + "\n")
    written["markdown"] = str(md)
    return written


if __name__ == "__main__":  # the command line moved to `prunepath study-report` (prunepath.cli.study_report)
    sys.exit("python -m prunepath.pipeline.study_report moved: run `prunepath study-report` (same options)")
