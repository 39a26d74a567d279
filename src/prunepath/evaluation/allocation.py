"""Per-layer budgets from calibration: choose one τ per layer so that the model reaches a target global s_FFN
with the least measured damage (a greedy allocation in the spirit of TEAL's).

``method="uniform"``: one τ for every layer, the existing bisection (:func:`find_tau_for_sparsity`).

``method="greedy"``:

1. One forward on the calibration tokens with every expert on (gates as configured). A pre-hook on every
   PrunePath FFN measures, on the FFN input it actually receives, for each τ of a grid: the layer's s_FFN and the
   relative output error ‖y_τ − y_dense‖² / ‖y_dense‖² of the FFN (router + experts only, summed over tokens).
   The selection rule keeps nested expert sets as τ falls, so every grid point is read off one suffix sum of the
   per-expert outputs (O(tokens · E · d) per layer whatever the grid size); nothing is cached.
2. Greedy: every layer starts at the densest grid point; repeatedly lower τ in the layer whose next grid point
   costs the least error per unit of s_FFN gained (the slope to the best later point, i.e. a step along the
   lower convex hull of that layer's curve), until the mean s_FFN over layers reaches the target. The path is
   continued to one expert per token everywhere so that step 3 can move along it.
3. Verification with the real routing: one forward with the chosen ``layer_tau`` measures the achieved s_FFN;
   while it is more than ``tol`` / 2 from the target, the point moves along the greedy path (the τ of the layer
   being moved is interpolated between grid points), guessed from the predicted curve shifted by the last
   observed offset and bracketed like a bisection.

What the local measure ignores: the table is measured on the inputs each FFN sees when every layer is dense, so
the compounding of errors across layers (and their effect on later layers' routing) is not modelled; the final
s_FFN is measured with the real routing, the quality is only as good as the local proxy.
"""

from __future__ import annotations

import bisect
import math
import os
from dataclasses import replace
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from prunepath.errors import PrunePathError
from prunepath.evaluation.common import ActiveMeter, check_token_ids, pad_id, prepare_model
from prunepath.models.adapters import needs_bos
from prunepath.calibration import calibration_texts
from prunepath.conversion.moefy import prunepath_modules
from prunepath.data.corpora import is_corpus_name
from prunepath.data.lm import tokenize_documents
from prunepath.evaluation.calibration import find_tau_for_sparsity
from prunepath.evaluation.perplexity import plan_windows, window_batches
from prunepath.evaluation.perplexity import tokenize_text
from prunepath.routing.control import configure
from prunepath.routing.methods import get_method
from prunepath.routing.control import routing_scope
from prunepath.routing.config import TAU_ALL, validate_sparsity_fraction
from prunepath.state import state_of

METHODS = ("greedy", "uniform")
#: dense, then 0.975 … 0.025 in steps of 0.025, then one expert per token (τ → 0)
DEFAULT_TAU_GRID: tuple[float, ...] = (TAU_ALL,) + tuple(round(0.975 - 0.025 * i, 3) for i in range(39)) + (1e-6,)
TOP1_TAU = 1e-6
DENSE_TAU = TAU_ALL


# ---- calibration tokens --------------------------------------------------------------------------------------
def calibration_ids(tokenizer, calib, max_tokens: int | None) -> torch.Tensor:
    """1-D token ids from ``calib``: a token-id tensor/list, a list of texts (documents joined by EOS), a text
    file path, or a registry corpus name (``mix:sotu,brown``: training documents, round-robin)."""

    if isinstance(calib, str) and not os.path.exists(calib):
        if is_corpus_name(calib):
            calib, _ = calibration_texts(calib)
    if isinstance(calib, (list, tuple)) and calib and all(isinstance(t, str) for t in calib):
        if tokenizer is None:
            raise PrunePathError("calibration texts need a tokenizer (pass the model's tokenizer or token ids)")
        ids = torch.tensor(tokenize_documents(list(calib), tokenizer, max_tokens=max_tokens), dtype=torch.long)
    elif calib is None or (isinstance(calib, (list, tuple)) and not calib):
        raise PrunePathError("no calibration data: pass texts, token ids, a text file or a corpus name "
                             "(e.g. mix:sotu,moby-dick,austen,brown)")
    else:
        ids = tokenize_text(tokenizer, calib, max_tokens)
    return ids[:max_tokens] if max_tokens is not None else ids


def _check_model(model: nn.Module):
    cfg = state_of(model).config
    if cfg is None:
        raise PrunePathError("per-layer allocation needs a converted model (prunepath.moefy or a PrunePath "
                             "checkpoint); a dense model has s_FFN 0 at any τ")
    if cfg.routing.method != "prunepath" or cfg.routing.rule not in ("cumulative", "nucleus"):
        raise PrunePathError(f"per-layer allocation tunes τ of the cumulative/nucleus rule; this model routes with "
                             f"method={cfg.routing.method!r}, rule={cfg.routing.rule!r} (set --rule cumulative)")
    return cfg


def validate_tau_grid(tau_grid: Sequence[float] | None) -> list[float]:
    """Descending, de-duplicated grid that always contains a dense point (τ > 1) and one expert per token."""
    if tau_grid is None:
        return list(DEFAULT_TAU_GRID)
    try:
        vals = [float(t) for t in tau_grid]
    except (TypeError, ValueError) as exc:
        raise PrunePathError(f"tau_grid must be numbers (got {tau_grid!r})") from exc
    if any(not t > 0 or math.isnan(t) for t in vals):
        raise PrunePathError(f"every τ of tau_grid must be > 0 (got {list(tau_grid)})")
    vals = sorted(set(vals) | {DENSE_TAU if not any(t > 1 for t in vals) else max(vals), TOP1_TAU}, reverse=True)
    return vals


# ---- forwards over the calibration windows -------------------------------------------------------------------
def _run_windows(model: nn.Module, ids: torch.Tensor, window: int, bos_id: int | None, pad: int,
                 before: Callable[[torch.Tensor], None] | None = None, batch_size: int = 4,
                 progress: bool = False, desc: str = "") -> dict:
    """Forward every calibration window (the perplexity window protocol, no LM head); returns the active-expert
    meter's result on the scored positions. ``before(mask)`` is called before each batch's forward."""

    plan = plan_windows(int(ids.numel()), window, window, bos_id is not None)
    meter = ActiveMeter(model)
    dev = next(model.parameters()).device
    base = model.get_submodule(model.base_model_prefix) if getattr(model, "base_model_prefix", "") and \
        hasattr(model, model.base_model_prefix) else model
    batches = window_batches(ids, plan, bos_id, pad, batch_size)
    for inp, _, mask in tqdm(batches, total=math.ceil(len(plan) / batch_size), desc=desc, disable=not progress,
                             leave=False):
        mask = mask.to(dev)
        if before is not None:
            before(mask)
        base(input_ids=inp.to(dev), use_cache=False)
        meter.update(model, mask)
    return meter.result()


# ---- the per-layer table -------------------------------------------------------------------------------------
class _LayerAccumulator:
    """Sums over tokens, for one FFN and every τ of the grid, of active experts and ‖y_τ − y_dense‖²."""

    def __init__(self, ffn: nn.Module, taus: Sequence[float], chunk: int = 512) -> None:
        self.ffn = ffn
        self.taus = list(taus)
        self.chunk = chunk
        base = ffn.routing
        self.method = get_method(base.method)
        self.cfgs = [replace(base, tau=float(t), layer_tau={}, allocation={}) for t in self.taus]
        self.dense_cfg = replace(base, tau=DENSE_TAU, layer_tau={}, allocation={})
        self.active = torch.zeros(len(self.taus), dtype=torch.float64)
        self.err = torch.zeros(len(self.taus), dtype=torch.float64)
        self.dense_sq = 0.0
        self.tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        for part in x.split(self.chunk):
            a, e, d = _chunk_stats(self.ffn, part, self.method, self.cfgs, self.dense_cfg)
            self.active += a
            self.err += e
            self.dense_sq += d
            self.tokens += part.shape[0]

    def table(self) -> dict:
        e = self.ffn.num_experts
        n = max(self.tokens, 1)
        return {"s_ffn": (1.0 - self.active / n / e).tolist(),
                "rel_error": (self.err / max(self.dense_sq, 1e-30)).tolist(),
                "tokens": self.tokens}


def _chunk_stats(ffn, x: torch.Tensor, method, cfgs, dense_cfg) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(active-expert sums [G], ‖y_τ − y_dense‖² sums [G], ‖y_dense‖² sum) for tokens x [n, d]."""
    e, ne = ffn.num_experts, ffn.neurons_per_expert
    cdt = torch.float64 if ffn.down_proj.weight.dtype == torch.float64 else torch.float32
    logits = ffn.router(x)
    w_dense, _ = method(logits, dense_cfg, ffn.layer_index, ffn.always_on)  # [n, E] float32 gates (or 1)
    masks = torch.stack([method(logits, c, ffn.layer_index, ffn.always_on)[1] for c in cfgs])  # [G, n, E]
    counts = masks.sum(-1)  # [G, n]
    # The rule keeps nested sets as τ falls: order experts by how many grid points keep them, then every grid
    # point keeps a prefix of that order, and its error is the norm of one suffix sum of the expert outputs.
    keep = masks.sum(0)  # [n, E]
    order = torch.sort(keep, dim=-1, descending=True, stable=True).indices
    sorted_masks = torch.gather(masks, 2, order.unsqueeze(0).expand_as(masks))
    if bool((sorted_masks[..., 1:] & ~sorted_masks[..., :-1]).any()):
        raise PrunePathError(f"routing method {dense_cfg.method!r} does not keep nested expert sets as τ falls; "
                             "the greedy allocation needs the cumulative or nucleus rule")
    h = ffn.intermediate(x).to(cdt).view(-1, e, ne)
    w = ffn.down_proj.weight.to(cdt).view(-1, e, ne)  # [d, E, n]
    contrib = torch.einsum("ten,den->ted", h, w) * w_dense.to(cdt).unsqueeze(-1)  # [n, E, d]
    contrib = torch.gather(contrib, 1, order.unsqueeze(-1).expand_as(contrib))
    suffix = contrib.flip(1).cumsum(1).flip(1)  # suffix[:, k] = Σ_{j ≥ k} contrib[:, j]
    sq = torch.cat([suffix.pow(2).sum(-1), suffix.new_zeros(suffix.shape[0], 1)], 1)  # [n, E + 1]
    err = torch.gather(sq, 1, counts.t().long()).sum(0)  # [G]
    y = suffix[:, 0]
    if ffn.down_proj.bias is not None:
        y = y + ffn.down_proj.bias.to(cdt)
    return counts.double().sum(1).cpu(), err.double().cpu(), float(y.double().pow(2).sum())


def layer_error_table(ffn: nn.Module, x: torch.Tensor, tau_grid: Sequence[float], chunk: int = 512) -> dict:
    """For FFN inputs ``x`` [..., d] and each τ of ``tau_grid`` (this FFN's routing otherwise as configured):
    ``s_ffn`` (fraction of inactive experts) and ``rel_error`` = Σ‖y_τ − y_dense‖² / Σ‖y_dense‖² over tokens,
    y_dense = every expert on. Lists in grid order; ``tokens``."""
    acc = _LayerAccumulator(ffn, tau_grid, chunk)
    acc.add(x.detach())
    return acc.table()


# ---- greedy path ---------------------------------------------------------------------------------------------
def greedy_path(s: torch.Tensor, err: torch.Tensor, eps: float = 1e-9) -> list[tuple[int, int, int]]:
    """Moves (layer position, from grid index, to grid index) from every layer at index 0 until no layer can
    gain s_FFN: each move lowers τ in the layer with the smallest error increase per unit of s_FFN gained (the
    slope to its best later grid point). ``s``, ``err``: [L, G] in grid order (τ descending)."""
    s = s.double()
    err = err.double()
    num_layers, g = s.shape
    idx = [0] * num_layers
    moves = []
    cols = torch.arange(g)
    while True:
        cur = torch.tensor(idx)
        ds = s - s[torch.arange(num_layers), cur].unsqueeze(1)
        de = err - err[torch.arange(num_layers), cur].unsqueeze(1)
        ok = (cols.unsqueeze(0) > cur.unsqueeze(1)) & (ds > eps)
        if not bool(ok.any()):
            return moves
        slope = torch.where(ok, de / ds.clamp_min(eps), torch.full_like(ds, math.inf))
        best_j = slope.argmin(1)  # the first (smallest step) among equal slopes
        best = slope[torch.arange(num_layers), best_j]
        layer = int(best.argmin())
        j = int(best_j[layer])
        moves.append((layer, idx[layer], j))
        idx[layer] = j


class _Path:
    """The greedy path as a continuous parameter u ∈ [0, K]: state k after k moves; in between, the moving
    layer's τ is interpolated linearly between its two grid points (and the predicted s_FFN with it)."""

    def __init__(self, moves, s: torch.Tensor, taus: Sequence[float]) -> None:
        self.moves = moves
        self.taus = list(taus)
        num_layers = s.shape[0]
        idx = [0] * num_layers
        pred = [float(s[:, 0].mean())]
        states = [list(idx)]
        total = float(s[:, 0].sum())
        for layer, a, b in moves:
            total += float(s[layer, b] - s[layer, a])
            idx[layer] = b
            states.append(list(idx))
            pred.append(total / num_layers)
        self.states = states
        self.pred = pred

    @property
    def length(self) -> int:
        return len(self.moves)

    def taus_at(self, u: float) -> list[float]:
        k = min(int(math.floor(u)), self.length)
        out = [self.taus[i] for i in self.states[k]]
        frac = u - k
        if frac > 0 and k < self.length:
            layer, a, b = self.moves[k]
            ta, tb = min(self.taus[a], 1.0), self.taus[b]  # every τ ≥ 1 keeps (almost) every expert
            out[layer] = ta + frac * (tb - ta)
        return out

    def pred_at(self, u: float) -> float:
        k = min(int(math.floor(u)), self.length)
        if k >= self.length:
            return self.pred[-1]
        return self.pred[k] + (u - k) * (self.pred[k + 1] - self.pred[k])

    def u_for(self, s_target: float) -> float:
        """The smallest u with predicted s_FFN ≥ ``s_target`` (clamped to the path)."""
        if s_target <= self.pred[0]:
            return 0.0
        if s_target >= self.pred[-1]:
            return float(self.length)
        k = bisect.bisect_left(self.pred, s_target) - 1  # pred[k] < target <= pred[k+1]
        span = self.pred[k + 1] - self.pred[k]
        return k + (0.0 if span <= 0 else (s_target - self.pred[k]) / span)


# ---- the public entry point ----------------------------------------------------------------------------------
def _layer_tables(model: nn.Module, ffns: list, taus: list[float], ids: torch.Tensor, window: int, bos_id, pad: int,
                  progress: bool) -> list[dict]:
    """Each layer's s_FFN and relative error over the τ grid, on the inputs of one dense forward."""
    accs = [_LayerAccumulator(f, taus) for f in ffns]
    current: dict[str, torch.Tensor] = {}

    def hook_for(acc):
        def hook(_mod, args):
            x = args[0]
            m = current["mask"]
            acc.add(x[m] if x.shape[:-1] == m.shape else x.reshape(-1, x.shape[-1]))
        return hook

    with torch.inference_mode(), routing_scope(model, tau=DENSE_TAU, layer_tau={}, allocation={}):
        handles = [f.register_forward_pre_hook(hook_for(a)) for f, a in zip(ffns, accs)]
        try:
            _run_windows(model, ids, window, bos_id, pad, before=lambda m: current.__setitem__("mask", m),
                         progress=progress, desc="allocation: per-layer table")
        finally:
            for h in handles:
                h.remove()
    return [a.table() for a in accs]


def allocate_layer_tau(
    model: nn.Module,
    tokenizer,
    calib,
    target: float,
    *,
    method: str = "greedy",
    max_tokens: int = 16384,
    window: int = 512,
    tau_grid: Sequence[float] | None = None,
    tol: float = 0.01,
    max_iter: int = 20,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Per-layer τ for a global s_FFN ``target`` on calibration data (texts, token ids, a file, a corpus name).

    Returns ``layer_tau`` {layer: τ}, ``s_ffn`` (achieved on the calibration tokens with the real routing),
    ``per_layer_s_ffn``, ``target``, ``method``, ``tokens``, ``within_tol`` (|s_ffn − target| ≤ ``tol``),
    ``window``; greedy adds ``tau_grid``, ``table`` (per-layer ``s_ffn`` / ``rel_error`` over the grid, measured
    with every layer dense), ``predicted_s_ffn`` and ``history`` [(u, s_FFN)] of the verification forwards;
    uniform adds ``tau``. The model's routing is left as it was; :func:`apply_allocation` installs the result.
    Any ``layer_tau`` already set on the model is replaced, not combined.
    """

    if method not in METHODS:
        raise PrunePathError(f"unknown allocation method {method!r}; choose one of {', '.join(METHODS)}")
    target = validate_sparsity_fraction(target, "target sparsity")
    if not 0 < tol < 1:
        raise PrunePathError(f"tol must be in (0, 1) (got {tol})")
    if window < 1:
        raise PrunePathError(f"window must be >= 1 (got {window})")
    _check_model(model)
    taus = validate_tau_grid(tau_grid)
    prepare_model(model, device)
    ids = calibration_ids(tokenizer, calib, max_tokens)
    if ids.numel() < window:
        raise PrunePathError(f"the calibration data has {ids.numel()} tokens, fewer than one window of {window}; "
                             "pass more calibration text (or a larger --calib-tokens) or a smaller --window")
    check_token_ids(model, ids)
    bos_id = int(tokenizer.bos_token_id) if tokenizer is not None and needs_bos(model, tokenizer) else None
    pad = pad_id(tokenizer) if tokenizer is not None else 0
    ffns = prunepath_modules(model)
    layers = [f.layer_index for f in ffns]
    out = {"target": target, "method": method, "tokens": int(ids.numel()), "window": window, "tol": tol}

    if method == "uniform":
        with routing_scope(model, layer_tau={}, allocation={}):
            cal = find_tau_for_sparsity(model, tokenizer, ids, target, tol=tol, max_tokens=int(ids.numel()),
                                        window=window, progress=progress)
            with routing_scope(model, tau=cal["tau"]):
                res = _run_windows(model, ids, window, bos_id, pad)
        out.update(layer_tau={i: float(cal["tau"]) for i in layers}, tau=float(cal["tau"]), s_ffn=res["s_ffn"],
                   per_layer_s_ffn=res["per_layer_s_ffn"], within_tol=abs(res["s_ffn"] - target) <= tol,
                   history=cal["history"])
        return out

    # 1. the per-layer table, on the inputs of a dense forward
    tables = _layer_tables(model, ffns, taus, ids, window, bos_id, pad, progress)
    s_tab = torch.tensor([t["s_ffn"] for t in tables], dtype=torch.float64)
    e_tab = torch.tensor([t["rel_error"] for t in tables], dtype=torch.float64)
    s_max = float(s_tab[:, -1].mean())  # one expert per token (+ always-on) everywhere: exact, not a prediction
    if target > s_max + tol:
        raise PrunePathError(f"target s_FFN {target} is beyond reach: one expert per token in every layer (τ→0) "
                             f"gives {s_max:.4f}; choose a target ≤ {s_max:.3f}")

    # 2. greedy path; 3. verify with the real routing and move along the path until within tol / 2
    path = _Path(greedy_path(s_tab, e_tab), s_tab, taus)
    history: list[tuple[float, float]] = []
    results: dict[float, dict] = {}

    def real(u: float) -> float:
        lt = dict(zip(layers, path.taus_at(u)))
        with torch.inference_mode(), routing_scope(model, layer_tau=lt, allocation={}):
            results[u] = _run_windows(model, ids, window, bos_id, pad)
        history.append((u, results[u]["s_ffn"]))
        return results[u]["s_ffn"]

    lo, hi = 0.0, float(path.length)
    u = path.u_for(target)
    use_guess = True
    bar = tqdm(range(max_iter), desc=f"allocation: verifying s_FFN {target:.3f}", disable=not progress,
               leave=False)
    for _ in bar:
        s = real(u)
        bar.set_postfix(s_ffn=f"{s:.4f}")
        if abs(s - target) <= tol / 2:
            break
        width = hi - lo
        if s < target:
            lo = u
        else:
            hi = u
        if hi - lo < 1e-9:
            break
        guess = path.u_for(target - (s - path.pred_at(u)))  # the predicted curve, shifted by the last offset
        # safeguarded: after a guess that did not halve the bracket, the next point is the midpoint
        u = guess if use_guess and lo < guess < hi else 0.5 * (lo + hi)
        use_guess = hi - lo <= 0.5 * width
    bar.close()
    best_u, best_s = min(history, key=lambda h: abs(h[1] - target))
    res = results[best_u]
    out.update(layer_tau=dict(zip(layers, path.taus_at(best_u))), s_ffn=best_s,
               per_layer_s_ffn=res["per_layer_s_ffn"], within_tol=abs(best_s - target) <= tol,
               predicted_s_ffn=path.pred_at(best_u), tau_grid=taus, history=history,
               table={"layers": layers, "s_ffn": s_tab.tolist(), "rel_error": e_tab.tolist()})
    return out


def apply_allocation(model: nn.Module, allocation: dict, *, calibration: str | None = None) -> dict:
    """Install an :func:`allocate_layer_tau` result on ``model`` (``layer_tau`` plus its provenance in
    ``routing.allocation``, which :func:`prunepath.save` stores in the checkpoint). Returns the provenance."""

    prov = {"target": allocation["target"], "method": allocation["method"], "s_ffn": allocation["s_ffn"],
            "tokens": allocation["tokens"], "window": allocation.get("window")}
    if calibration is not None:
        prov["calibration"] = str(calibration)
    configure(model, layer_tau={int(k): float(v) for k, v in allocation["layer_tau"].items()},
                        allocation=prov)
    return prov
