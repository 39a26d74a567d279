"""Tables and the frontier plot of the LM study from its merged results (``prunepath.pipeline.lm_study``).

    python -m prunepath.pipeline.study_report RESULTS_DIR [--tag smollm2] [--docs docs] [--img docs/img]

Reads RESULTS_DIR/lm-TAG.json (+ topk-TAG.json, gen-TAG-raw.json, gen-TAG-predictions.jsonl,
study-TAG-meta.json when present); writes DOCS/results/lm-TAG.json (copy), DOCS/results/gen-TAG.json (ROUGE-L
computed here: rouge-score is not on the GPU machine), DOCS/results/topk-TAG.json, DOCS/results/study-lm-TAG.md
(markdown tables) and IMG/study-lm-TAG.png (PPL vs s_FFN, every method).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

from prunepath.evaluation.reports import atomic_write_text, write_json

CURVES = [  # (method, variant or None, label, style)
    ("prunepath-sweep", "warmstart+offset", "PrunePath (warm start + gate offset), τ sweep", "o-"),
    ("prunepath-sweep", "paper-defaults", "PrunePath (paper defaults), τ sweep", "o--"),
    ("prunepath-sweep", "warmstart+offset+distill", "PrunePath (+ distillation α 0.8), τ sweep", "o:"),
    ("prunepath-sweep", "warmstart+offset+distill(1.0)", "PrunePath (+ distillation α 1.0), τ sweep", "o:"),
    ("prunepath-sweep", "warmstart+offset+distill+router-distill", "PrunePath (+ distillation + router distill), τ sweep",
     "o-."),
    ("prunepath-sweep", "warmstart+offset+distill+router-distill(4)",
     "PrunePath (+ distillation + router distill ×4), τ sweep", "o-."),
    ("prunepath", None, "PrunePath trained to τ_min (at τ_min ± 0.05)", "*"),
    ("lte", None, "LTE (trained), δ sweep", "s-"),
    ("moefication-topk", None, "MoEfication top-k", "^-"),
    ("d2dmoe", None, "D2DMoE", "v-"),
    ("wanda", None, "Wanda (weight sparsity)", "x-"),
    ("static", None, "static expert pruning", "d-"),
]
TARGETS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]


def curve(rows: list[dict], method: str, variant: str | None) -> list[dict]:
    pts = [r for r in rows if r["method"] == method and (variant is None or r.get("variant") == variant)
           and r.get("ppl") is not None and math.isfinite(r["ppl"])]
    return sorted(pts, key=lambda r: r["s_ffn"])


def ppl_at(points: list[dict], s: float) -> float | None:
    """PPL at s_FFN ``s`` by linear interpolation of log PPL between measured points (None outside them).
    On a non-monotone curve the best (lowest) PPL at any bracketing pair is used."""
    best = None
    for a, b in zip(points, points[1:]):
        if a["s_ffn"] <= s <= b["s_ffn"]:
            if b["s_ffn"] == a["s_ffn"]:
                v = min(a["ppl"], b["ppl"])
            else:
                w = (s - a["s_ffn"]) / (b["s_ffn"] - a["s_ffn"])
                v = math.exp((1 - w) * math.log(a["ppl"]) + w * math.log(b["ppl"]))
            best = v if best is None else min(best, v)
    for p in points:
        if abs(p["s_ffn"] - s) < 1e-9:
            best = p["ppl"] if best is None else min(best, p["ppl"])
    return best


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


def frontier_table(rows: list[dict]) -> str:
    ft = _ref(rows, "dense-finetuned")
    base = ft["ppl"] if ft else None
    head = "| method | " + " | ".join(f"s={t:.1f}" for t in TARGETS) + " |"
    lines = [head, "|" + "---|" * (len(TARGETS) + 1)]
    for method, variant, label, _ in CURVES:
        pts = curve(rows, method, variant)
        if not pts or method == "prunepath":
            continue
        cells = []
        for t in TARGETS:
            v = ppl_at(pts, t)
            cells.append("–" if v is None else f"{v:.2f}" + (f" ({v / base:.2f}×)" if base else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def records_table(rows: list[dict]) -> str:
    ft = _ref(rows, "dense-finetuned")
    lines = ["| method | variant | knob | s_FFN | PPL | × dense-ft | train tokens | eval tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], str(r.get("variant")), r["s_ffn"])):
        knob = r.get("knob") or ({"tau": r["tau"]} if r.get("tau") is not None else {})
        if r["method"] == "prunepath" and r.get("tau_min") is not None:
            knob = {"tau_min": r["tau_min"], "tau": r["tau"]}
        knob_s = ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in knob.items())
        ratio = f"{r['ppl'] / ft['ppl']:.2f}" if ft else "–"
        lines.append(f"| {r['method']} | {r.get('variant') or ''} | {knob_s} | {r['s_ffn']:.3f} | {r['ppl']:.2f} | "
                     f"{ratio} | {r.get('train_tokens', 0):,} | {r.get('eval_tokens', 0):,} |")
    return "\n".join(lines)


def targets_check(rows: list[dict]) -> str:
    """The issue's two targets, for every PrunePath τ-sweep setting in the results; the best one decides."""
    ft = _ref(rows, "dense-finetuned")
    variants = list(dict.fromkeys(r.get("variant") for r in rows if r["method"] == "prunepath-sweep"))
    if not ft or not variants:
        return "(no dense-finetuned or PrunePath sweep yet)"
    out = []
    for s, goal in ((0.5, 1.3), (0.4, 1.15)):
        got = {v: ppl_at(curve(rows, "prunepath-sweep", v), s) for v in variants}
        got = {v: p for v, p in got.items() if p is not None}
        if not got:
            out.append(f"- s_FFN {s}: not reached by any sweep")
            continue
        best = min(got, key=got.get)
        ratio = got[best] / ft["ppl"]
        others = "; ".join(f"{v}: {p:.2f}" for v, p in got.items() if v != best)
        out.append(f"- s_FFN {s}: PrunePath ({best}) PPL {got[best]:.2f} = {ratio:.2f}× dense fine-tuned "
                   f"({ft['ppl']:.2f}); target ≤ {goal}× — {'met' if ratio <= goal else 'missed'}"
                   + (f" (other settings: {others})" if others else ""))
    return "\n".join(out)


def plot(rows: list[dict], out_png: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=120)
    for method, variant, label, style in CURVES:
        pts = curve(rows, method, variant)
        pts = [p for p in pts if p["s_ffn"] > 0 or method.startswith("prunepath")]
        if pts:
            ax.plot([p["s_ffn"] for p in pts], [p["ppl"] for p in pts], style, ms=5 if style != "*" else 9,
                    label=label, lw=1.2)
    for method, ls in (("dense", ":"), ("dense-finetuned", "--")):
        r = _ref(rows, method)
        if r:
            ax.axhline(r["ppl"], color="k", ls=ls, lw=1, label=f"{method} ({r['ppl']:.2f})")
    ft = _ref(rows, "dense-finetuned")
    if ft:
        ax.set_ylim(top=min(ax.get_ylim()[1], ft["ppl"] * 20), bottom=ft["ppl"] * 0.9)
    ax.set_yscale("log")
    ax.set_xlabel("s_FFN (fraction of FFN compute skipped; Wanda: weight sparsity)")
    ax.set_ylabel("WikiText-2 validation PPL (lower is better)")
    ax.set_xlim(-0.02, 0.95)
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6.5, loc="upper left")
    fig.tight_layout()
    from prunepath.evaluation.plots import save_figure

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
    from prunepath.evaluation.generation import rouge_scores

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


def build(results: Path, tag: str, docs: Path, img: Path) -> dict:
    rows = json.loads((results / f"lm-{tag}.json").read_text())
    meta_p = results / f"study-{tag}-meta.json"
    meta = json.loads(meta_p.read_text()) if meta_p.exists() else {}
    (docs / "results").mkdir(parents=True, exist_ok=True)
    written = {"lm": str(write_json(docs / "results" / f"lm-{tag}.json", rows))}
    png = plot(rows, img / f"study-lm-{tag}.png",
               f"{rows[0]['model'] if rows else tag}: WikiText-2 validation ({rows[0]['eval_tokens'] if rows else '?'} "
               f"tokens) PPL vs s_FFN")
    written["plot"] = str(png)
    parts = [f"# LM study: {rows[0]['model'] if rows else tag}", "",
             f"Training budget per trained method: {_n(meta.get('train_tokens_budget'))} tokens of "
             f"`{(meta.get('train') or {}).get('data', '?')}`; evaluation: WikiText-2 validation, "
             f"{rows[0]['eval_tokens'] if rows else '?'} tokens, window {rows[0].get('window') if rows else '?'}.", "",
             f"![frontier]({os.path.relpath(png, docs / 'results')})", "", "## PPL at fixed s_FFN (interpolated in log PPL; × dense "
             "fine-tuned)", "", frontier_table(rows), "", "## Targets (issue 7)", "", targets_check(rows), "",
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="the study's merged results folder (OUT/results) or the files fetched from it")
    p.add_argument("--tag", default="smollm2")
    p.add_argument("--docs", default="docs")
    p.add_argument("--img", default="docs/img")
    a = p.parse_args(argv)
    for k, v in build(Path(a.results), a.tag, Path(a.docs), Path(a.img)).items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
