"""Run a recipe end to end, resumably: every finished stage leaves a file that a re-run picks up (the rows and
the sweep loop of the job engine, :mod:`prunepath.pipeline.jobs`).

    out/dense.json        dense reference metric
    out/model/            the converted (and trained) PrunePath checkpoint (+ training log / checkpoints)
    out/sweep.jsonl       one line per finished τ
    out/results.{json,csv,md}, out/frontier.png, out/summary.md
    out/timing.json       wall-clock seconds of every session (the first run, then each resume / re-run)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from prunepath.errors import PrunePathError
from prunepath.evaluation.sweep import nearest_sparsity, value_at_sparsity
from prunepath.pipeline.jobs import append_row, read_rows, resumable_sweep
from prunepath.pipeline.recipe import Recipe
from prunepath.baselines import activation
from prunepath.calibration import calibration_texts
from prunepath.data.corpora import is_corpus_name
from prunepath.data.text import load_texts
from prunepath.evaluation.common import check_text_file, resolve_data_path
from prunepath.evaluation.plots import plot_frontier
from prunepath.evaluation.reports import write_csv, write_json, write_markdown
from prunepath.evaluation.sweep import validate_taus
from prunepath.models.registry import check_builtin_typo
from prunepath.training.trainer import train_from_config
from prunepath.evaluation import perplexity
from prunepath.evaluation.perplexity import tokenize_text
import prunepath


def _log(msg: str) -> None:
    print(f"[prunepath run] {msg}", flush=True)


class _Timing:
    """Wall-clock time per session in ``out/timing.json``: a resumed or repeated run adds its own time instead of
    replacing the original run's (summary.md's ``time:`` line). Saved after every stage, so an interrupted
    session keeps what it had done."""

    def __init__(self, out: Path, t0: float) -> None:
        self.path = out / "timing.json"
        self.t0 = t0
        self.sessions: list[dict] = []
        try:
            self.sessions = list(json.loads(self.path.read_text()).get("sessions", []))
        except (OSError, ValueError, AttributeError):
            legacy = _summary_minutes(out / "summary.md")  # a run finished before timing.json existed
            if legacy is not None:
                self.sessions = [{"started": None, "seconds": legacy * 60, "from": "summary.md"}]
        self.sessions.append({"started": round(t0, 3), "seconds": 0.0})

    def save(self) -> None:
        self.sessions[-1]["seconds"] = round(time.time() - self.t0, 3)
        write_json(self.path, {"sessions": self.sessions})

    def line(self) -> str:
        self.save()
        first, later = self.sessions[0]["seconds"], [s["seconds"] for s in self.sessions[1:]]
        if not later:
            return f"time: {first / 60:.1f} min"
        n = len(later)
        return (f"time: {first / 60:.1f} min (first run) + {sum(later) / 60:.1f} min in {n} resumed "
                f"run{'s' if n > 1 else ''} = {(first + sum(later)) / 60:.1f} min")


def _summary_minutes(path: Path) -> float | None:
    """The first number of summary.md's ``time:`` line (minutes), or None."""
    import re

    try:
        m = re.search(r"^time: ([0-9.]+) min", path.read_text(), re.M)
    except OSError:
        return None
    return float(m.group(1)) if m else None


def _eval_kwargs(recipe: Recipe) -> dict:
    ev = recipe.evaluation
    return {k: ev[k] for k in ("window", "stride", "batch_size") if k in ev}


def _record(method: str, res: dict, recipe: Recipe, *, tau=None, train_tokens: int = 0) -> dict:
    return {"method": method, "model": res.get("model"), "s_ffn": float(res.get("s_ffn", 0.0)),
            "ppl": res["ppl"], "tau": tau, "eval_tokens": res["tokens"], "train_tokens": train_tokens,
            "window": res.get("window"), "stride": res.get("stride"), "data": recipe.evaluation.get("data"),
            "mean_active": res.get("mean_active"), "per_layer_s_ffn": res.get("per_layer_s_ffn")}


def _teal_rows(recipe: Recipe, model, tok, ids, out: Path, kw: dict, progress: bool) -> list[dict]:
    """TEAL (training-free, uniform thresholds calibrated on the training text's corpus) on the original model at
    ``sweep.teal`` targets, on the same evaluation tokens; one line per finished target in out/teal.jsonl."""
    targets = [float(t) for t in recipe.sweep.get("teal") or []]
    if not targets:
        return []

    path = out / "teal.jsonl"
    done = {r["target_s_ffn"]: r for r in read_rows(path)}
    todo = [t for t in targets if t not in done]
    if todo:
        src = str((recipe.train or {}).get("data") or "mix:sotu,moby-dick,austen,brown")
        # calibration text is training text (the corpus's training split), never the evaluation text
        texts = calibration_texts(src)[0] if is_corpus_name(src) else load_texts(src, "train")
        stats = activation.collect_activation_stats(model, tok, texts,
                                                    max_tokens=int(recipe.sweep.get("teal_calib_tokens", 4096)),
                                                    seq_len=int(kw.get("window", 512)), progress=progress)
        def evaluate(t: float) -> dict:
            activation.apply_activation_sparsity(model, activation.teal_thresholds(stats, t))
            res = perplexity.evaluate_perplexity(model, tok, ids, progress=progress, **kw)
            return {**_record("teal", res, recipe), "target_s_ffn": t}

        def save(row: dict) -> None:
            append_row(path, row)
            _log(f"TEAL target {row['target_s_ffn']}: PPL {row['ppl']:.3f} at measured s_FFN {row['s_ffn']:.3f}")

        try:
            resumable_sweep(todo, done, evaluate, save)
        finally:
            activation.remove_activation_sparsity(model)  # the original model goes on to conversion / training
    return sorted((done[t] for t in targets), key=lambda r: r["s_ffn"])


def _prepare_model(recipe: Recipe, model, tok, out: Path, progress: bool):
    """The PrunePath model to sweep: trained per the recipe, or converted untrained; resumes finished work."""

    ckpt = out / "model"
    if (ckpt / "prunepath_config.json").exists():
        _log(f"reusing the finished model in {ckpt}")
        trained, tok2 = prunepath.load(ckpt)
        meta = json.loads((ckpt / "train_result.json").read_text()) if (ckpt / "train_result.json").exists() else {}
        return trained, tok2 or tok, int(meta.get("tokens", 0) or 0)
    if recipe.train is None:
        prunepath.moefy(model, **recipe.convert, progress=progress)
        prunepath.save(model, ckpt, tokenizer=tok)
        return model, tok, 0

    cfg = recipe.train_config()
    cfg.progress = progress
    if ckpt.exists() and any(ckpt.iterdir()):
        cfg.resume = "auto"
        _log(f"resuming training in {ckpt}")
    _log(f"training: {cfg.stage1_steps} + {cfg.stage2_steps} steps x {cfg.tokens_per_step} tokens on {cfg.data}")
    result = train_from_config(model, tok, cfg, out_dir=ckpt)
    return model, tok, int(getattr(result, "tokens", 0) or 0)


def run_recipe(recipe: Recipe, *, progress: bool = True) -> dict:
    """Run ``recipe``; returns {"rows": [...], "summary": str, "out": path}. Safe to re-run after an interruption."""

    t0 = time.time()
    # Checked before anything is written or loaded: the model name and the evaluation text.
    check_builtin_typo(str(recipe.model))
    data_path = resolve_data_path(recipe.evaluation.get("data", "wikitext-2/wiki.valid.raw"))
    check_text_file(data_path)
    out = recipe.out_dir
    out.mkdir(parents=True, exist_ok=True)
    timing = _Timing(out, t0)
    write_json(out / "recipe.json", {k: v for k, v in vars(recipe).items()})
    max_tokens = recipe.evaluation.get("max_tokens")
    kw = _eval_kwargs(recipe)

    _log(f"model {recipe.model}")
    model, tok = prunepath.load_model(recipe.model)
    if tok is None:
        raise PrunePathError(f"{recipe.model} has no tokenizer; a run needs one to read {data_path}")
    ids = tokenize_text(tok, data_path, max_tokens, progress=progress)
    dense_row = None
    if recipe.sweep.get("dense", True) and not prunepath.is_converted(model):
        dense_file = out / "dense.json"
        if dense_file.exists():
            dense_row = json.loads(dense_file.read_text())
        else:
            _log(f"dense reference: perplexity on {ids.numel()} tokens of {data_path.name}")
            res = perplexity.evaluate_perplexity(model, tok, ids, progress=progress, **kw)
            dense_row = _record("dense", res, recipe)
            write_json(dense_file, dense_row)
            timing.save()
        _log(f"dense PPL {dense_row['ppl']:.3f}")

    teal_rows = _teal_rows(recipe, model, tok, ids, out, kw, progress) if not prunepath.is_converted(model) else []
    timing.save()
    model, tok, train_tokens = _prepare_model(recipe, model, tok, out, progress)
    timing.save()
    method = "prunepath-sweep" if recipe.train is not None else "prunepath-untrained"
    sweep_file = out / "sweep.jsonl"
    done = {r["tau"]: r for r in read_rows(sweep_file)}

    def evaluate(tau: float) -> dict:
        with prunepath.routing(model, tau=tau):
            res = perplexity.evaluate_perplexity(model, tok, ids, progress=progress, **kw)
        return _record(method, res, recipe, tau=tau, train_tokens=train_tokens)

    def save(row: dict) -> None:
        append_row(sweep_file, row)
        timing.save()
        _log(f"τ = {row['tau']}: PPL {row['ppl']:.3f}, s_FFN {row['s_ffn']:.3f}")

    resumable_sweep(sorted(validate_taus(recipe.sweep["taus"]), reverse=True), done, evaluate, save,
                    before=lambda tau: _log(f"τ = {tau}"))
    rows = sorted(done.values(), key=lambda r: -r["tau"])  # with any τ an earlier run of this out/ swept
    all_rows = ([dense_row] if dense_row else []) + rows + teal_rows
    write_json(out / "results.json", all_rows)
    columns = ["method", "tau", "s_ffn", "ppl", "eval_tokens", "train_tokens"]
    write_csv(out / "results.csv", all_rows, columns)
    write_markdown(out / "results.md", all_rows, title=f"{recipe.name}: {all_rows[0]['model']}", columns=columns)
    runs = [{"rows": rows, "dense": dense_row, "label": method}]
    if teal_rows:
        runs.append({"rows": teal_rows, "dense": None, "label": "TEAL on the original model (training-free)"})
    plot = plot_frontier(runs, out / "frontier.png", "ppl", title=f"{recipe.name}: WikiText-2 PPL vs s_FFN")

    lines = [f"# {recipe.name}", "", f"model: {all_rows[0]['model']}",
             f"evaluation: perplexity on {rows[0]['eval_tokens'] if rows else '?'} tokens of {data_path.name} "
             f"(window {kw.get('window', 512)})"]
    if train_tokens:
        lines.append(f"training: {train_tokens} tokens ({recipe.train.get('data')})")
    if dense_row:
        lines.append(f"original model (dense) PPL: {dense_row['ppl']:.2f}")
    sparse_rows = [r for r in rows if r["s_ffn"] > 0]
    orig = dense_row["ppl"] if dense_row else None
    all_on = next((r for r in rows if r["tau"] > 1), None)
    if all_on is not None:
        lines.append(f"PrunePath with every expert on (τ={all_on['tau']:g}): {all_on['ppl']:.2f}"
                     + (f" ({all_on['ppl'] / orig:.2f}x the original)" if orig else ""))
    for target in recipe.sweep.get("summary_sparsities", [0.2, 0.35, 0.5]):
        r = nearest_sparsity(sparse_rows, float(target))
        if r is not None:
            ratio = f" ({r['ppl'] / orig:.2f}x the original)" if orig else ""
            teal = value_at_sparsity(teal_rows, r["s_ffn"])
            vs = (f"; TEAL at the same s_FFN: {teal:.2f}" + (f" ({teal / orig:.2f}x)" if orig else "")) \
                if teal is not None else ""
            lines.append(f"PrunePath PPL at s_FFN {r['s_ffn']:.2f} (τ={r['tau']:g}): {r['ppl']:.2f}{ratio}{vs}")
    lines += [f"plot: {plot}", f"table: {out / 'results.md'}", timing.line()]
    summary = "\n".join(lines)
    (out / "summary.md").write_text(summary + "\n")
    return {"rows": all_rows, "summary": summary, "out": str(out), "plot": str(plot),
            "finite": all(math.isfinite(r["ppl"]) for r in all_rows)}
