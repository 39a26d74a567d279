"""One checkpoint, many τ: evaluate a task at each routing budget and return one row per τ (with s_FFN)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterable, Sequence

from torch import nn
from tqdm.auto import tqdm

from prunepath.errors import PrunePathError
from prunepath.evaluation.allocation import allocate_layer_tau
from prunepath.evaluation.calibration import find_tau_for_sparsity
from prunepath.evaluation.tasks import prepare_data, run_task
from prunepath.routing.ffn import is_converted
from prunepath.routing.control import routing_scope
from prunepath.baselines.activation import (apply_activation_sparsity, check_target, collect_activation_stats,
                                            remove_activation_sparsity, thresholds_for)
from prunepath.routing.config import TAU_ALL, TAU_SWEEP_MAX, is_valid_tau
from prunepath.state import state_of

# Keys that are large per-run details; kept in the rows (JSON) but not printed in tables.
DETAIL_KEYS = ("active_hist", "predictions", "samples", "per_layer_active", "per_layer_s_ffn")


def validate_taus(taus: Sequence[float]) -> list[float]:
    """Sorted, de-duplicated τ values; each must be in (0, 2] (τ > 1 keeps every expert)."""
    try:
        vals = [float(t) for t in taus]
    except (TypeError, ValueError) as exc:
        raise PrunePathError(f"taus must be numbers (got {taus!r})") from exc
    bad = [t for t in vals if not is_valid_tau(t, TAU_SWEEP_MAX)]
    if not vals or bad:
        raise PrunePathError(f"every τ must be in (0, 2] ({TAU_ALL} keeps all experts); got {list(taus)}")
    return sorted(set(vals))


def nearest_sparsity(rows: list[dict], target: float) -> dict | None:
    """The row whose ``s_ffn`` is closest to ``target`` (None for no rows)."""
    return min(rows, key=lambda r: abs(r["s_ffn"] - target)) if rows else None


def pareto_front(rows: list[dict], key: str = "ppl") -> list[dict]:
    """The rows no other row beats on both axes (at least as sparse and at most as bad), sorted by s_FFN: the
    frontier of a grid of two knobs (e.g. τ × in-expert fraction)."""
    import math

    pts = sorted((r for r in rows if r.get(key) is not None and math.isfinite(r[key])),
                 key=lambda r: (-r["s_ffn"], r[key]))
    front, best = [], math.inf
    for r in pts:  # from the sparsest down: keep a row when it is better than everything sparser
        if r[key] < best:
            front.append(r)
            best = r[key]
    return front[::-1]


def value_at_sparsity(rows: list[dict], s: float, key: str = "ppl") -> float | None:
    """``key`` at s_FFN ``s``, interpolated linearly in log(value) between the measured points that bracket it
    (None outside them); on a non-monotone curve the lowest bracketing value is used."""
    import math

    pts = sorted((r for r in rows if r.get(key) is not None and math.isfinite(r[key]) and r[key] > 0),
                 key=lambda r: r["s_ffn"])
    best = None
    for a, b in zip(pts, pts[1:]):
        if a["s_ffn"] <= s <= b["s_ffn"]:
            if b["s_ffn"] == a["s_ffn"]:
                v = min(a[key], b[key])
            else:
                w = (s - a["s_ffn"]) / (b["s_ffn"] - a["s_ffn"])
                v = math.exp((1 - w) * math.log(a[key]) + w * math.log(b[key]))
            best = v if best is None else min(best, v)
    for p in pts:
        if abs(p["s_ffn"] - s) < 1e-9:
            best = p[key] if best is None else min(best, p[key])
    return best


def envelope_at_sparsity(lines: list[list[dict]], s: float, key: str = "ppl") -> float | None:
    """The best ``key`` at s_FFN ``s`` over several one-knob lines (e.g. the in-expert fraction swept at each τ
    of a grid), each read with :func:`value_at_sparsity`: every value is an interpolation along one knob between
    two settings that were measured, so a setting in between reaches it. None when no line brackets ``s``."""
    vals = [v for v in (value_at_sparsity(line, s, key) for line in lines) if v is not None]
    return min(vals) if vals else None


def sweep(
    model: nn.Module,
    tokenizer,
    task: str,
    data: Any,
    taus: Sequence[float] | None = None,
    *,
    target_sparsities: Sequence[float] | None = None,
    calib_data: Any = None,
    calib_tokens: int = 4096,
    allocate: str = "uniform",
    progress: bool = True,
    **metric_kwargs,
) -> list[dict]:
    """Evaluate ``task`` on ``data`` at every τ in ``taus`` (ascending) — or at the τ calibrated for each of
    ``target_sparsities`` — on one converted model. The data is loaded / tokenized once. Each row is the task's
    result plus ``tau`` (and ``target_sparsity``); the model's routing is restored afterwards.

    ``allocate="greedy"`` (with ``target_sparsities``): a τ per layer for each target
    (:func:`prunepath.evaluation.allocation.allocate_layer_tau`); rows carry ``layer_tau`` and ``tau`` None.
    A per-layer allocation stored in the checkpoint is replaced by each point's τ."""

    if not is_converted(model):
        raise PrunePathError("a τ sweep needs a converted model (PrunePath checkpoint); a dense model has one "
                             "operating point — use `prunepath eval` for it")
    if (taus is None) == (target_sparsities is None):
        raise PrunePathError("give exactly one of taus or target_sparsities")
    if allocate not in ("uniform", "greedy"):
        raise PrunePathError(f"allocate must be 'uniform' or 'greedy' (got {allocate!r})")
    if allocate == "greedy" and target_sparsities is None:
        raise PrunePathError("allocate='greedy' needs target_sparsities (a τ per layer is chosen for each)")
    # a stored per-layer allocation would override every τ of the sweep: each point replaces it
    clear = {"layer_tau": {}, "allocation": {}} if state_of(model).config.routing.allocation else {}
    cached, metric_kwargs = _prepare(tokenizer, task, data, metric_kwargs)
    points: list[tuple[float, float | None, dict | None]] = []
    if target_sparsities is not None:
        for s in sorted(set(float(x) for x in target_sparsities)):
            src = calib_data if calib_data is not None else (cached if task == "ppl" else "wikitext-2/wiki.valid.raw")
            if allocate == "greedy":
                cal = allocate_layer_tau(model, tokenizer, src, s, method="greedy", max_tokens=calib_tokens,
                                         window=metric_kwargs.get("window") or 512, progress=False)
                points.append((None, s, cal))
                continue
            with routing_scope(model, **clear):
                cal = find_tau_for_sparsity(model, tokenizer, src, s, max_tokens=calib_tokens, progress=False)
            points.append((cal["tau"], s, cal))
    else:
        points = [(t, None, None) for t in validate_taus(taus)]
    def scope(point: tuple):
        tau, _, cal = point
        settings = {"tau": tau, **clear} if tau is not None else {"layer_tau": cal["layer_tau"], "allocation": {}}
        return routing_scope(model, **settings)

    def annotate(row: dict, point: tuple) -> None:
        tau, target, cal = point
        row["tau"] = tau
        if target is not None:
            row["target_sparsity"] = target
            row["calibration"] = {k: v for k, v in cal.items() if k not in ("history", "table")}
            if tau is None:
                row["allocate"] = "greedy"
                row["layer_tau"] = {str(k): v for k, v in cal["layer_tau"].items()}

    return _evaluate_points(model, tokenizer, task, data, cached, metric_kwargs, progress,
                            tqdm(points, desc=f"sweep {task}", disable=not progress, unit="τ"), scope, annotate)


def _prepare(tokenizer, task: str, data: Any, metric_kwargs: dict) -> tuple[Any, dict]:
    """The task's data, loaded / tokenized once for every point, and the metric arguments left for each point."""
    cached = prepare_data(tokenizer, task, data, **metric_kwargs)
    if task in ("ppl", "recon"):  # max_tokens was spent on preparing the data
        metric_kwargs = {k: v for k, v in metric_kwargs.items() if k != "max_tokens"}
    return cached, metric_kwargs


def _evaluate_points(model: nn.Module, tokenizer, task: str, data: Any, cached: Any, metric_kwargs: dict,
                     progress: bool, points: Iterable, scope: Callable[[Any], ContextManager],
                     annotate: Callable[[dict, Any], None]) -> list[dict]:
    """The one evaluation loop of the sweeps: for each point, the task under ``scope(point)``, then
    ``annotate(row, point)`` (and the data name)."""
    rows = []
    for point in points:
        with scope(point):
            kw = dict(metric_kwargs)
            if task != "lm-eval":
                kw["progress"] = progress
            row = run_task(model, tokenizer, task, cached, **kw)
        annotate(row, point)
        if isinstance(data, str):
            row["data"] = data
        rows.append(row)
    return rows


def activation_sweep(model: nn.Module, tokenizer, task: str, data: Any, method: str, targets: Sequence[float], *,
                     calib_texts: Sequence[str], allocation: str = "uniform", calib_tokens: int = 16384,
                     seq_len: int = 512, progress: bool = True, **metric_kwargs) -> list[dict]:
    """Evaluate ``task`` at each target s_FFN of TEAL / CATS, calibrating once (the data is prepared once too).
    Each row is the task's result plus ``target_sparsity``, ``method`` and ``allocation``; the model is left as
    it was (without wrappers)."""
    targets = sorted(set(float(t) for t in targets))
    for t in targets:
        check_target(method, t, allocation)
    remove_activation_sparsity(model)
    stats = collect_activation_stats(model, tokenizer, calib_texts, max_tokens=calib_tokens, seq_len=seq_len,
                                     progress=progress)
    cached, metric_kwargs = _prepare(tokenizer, task, data, metric_kwargs)

    def scope(t: float):  # the thresholds stay until the next point replaces them (removed once, at the end)
        apply_activation_sparsity(model, thresholds_for(stats, method, t, allocation))
        return contextlib.nullcontext()

    def annotate(row: dict, t: float) -> None:
        row.update(target_sparsity=t, method=method, allocation=allocation, tau=None)

    try:
        return _evaluate_points(model, tokenizer, task, data, cached, metric_kwargs, progress, targets, scope,
                                annotate)
    finally:
        remove_activation_sparsity(model)
