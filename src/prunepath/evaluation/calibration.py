"""Find the τ that gives a target s_FFN on calibration text (bisection; s_FFN falls as τ grows)."""

from __future__ import annotations

import os

import torch
from torch import nn
from tqdm.auto import tqdm

from prunepath.errors import PrunePathError
from prunepath.evaluation.common import ActiveMeter, check_token_ids, pad_id, prepare_model
from prunepath.models.adapters import needs_bos
from prunepath.evaluation.perplexity import plan_windows, window_batches
from prunepath.evaluation.perplexity import tokenize_text
from prunepath.routing.control import routing_scope
from prunepath.routing.config import TAU_ALL
from prunepath.state import state_of


@torch.inference_mode()
def measure_sparsity(model: nn.Module, ids: torch.Tensor, *, window: int = 512, batch_size: int = 4,
                     bos_id: int | None = None, pad: int = 0) -> float:
    """s_FFN of the current routing on ``ids`` under the perplexity window protocol (no loss computed)."""

    plan = plan_windows(int(ids.numel()), window, window, bos_id is not None)
    meter = ActiveMeter(model)
    dev = next(model.parameters()).device
    base = model.get_submodule(model.base_model_prefix) if getattr(model, "base_model_prefix", "") and \
        hasattr(model, model.base_model_prefix) else model
    for inp, _, mask in window_batches(ids, plan, bos_id, pad, batch_size):
        base(input_ids=inp.to(dev), use_cache=False)  # the LM head is not needed for routing statistics
        meter.update(model, mask.to(dev))
    return float(meter.result()["s_ffn"])


def find_tau_for_sparsity(
    model: nn.Module,
    tokenizer,
    calib_data: str | os.PathLike | list[int] | torch.Tensor,
    target: float,
    tol: float = 0.01,
    *,
    max_tokens: int = 4096,
    window: int = 512,
    max_iter: int = 30,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Bisection on τ ∈ (0, 1] until s_FFN is within ``tol`` / 2 of ``target`` on the calibration tokens.

    Returns ``tau``, ``s_ffn`` (achieved), ``target``, ``tokens``, ``iterations``, ``history`` [(τ, s_FFN)].
    Leaves the model's routing as it was. The reachable range is [s_FFN(τ=1), s_FFN(τ→0) = top-1 only].
    """

    cfg = state_of(model).config
    if cfg is None:
        raise PrunePathError("--target-sparsity needs a converted model; a dense model has s_FFN 0 at any τ")
    if cfg.routing.method != "prunepath" or cfg.routing.rule not in ("cumulative", "nucleus"):
        raise PrunePathError(f"target-sparsity calibration tunes τ of the cumulative/nucleus rule; this model "
                             f"routes with method={cfg.routing.method!r}, rule={cfg.routing.rule!r}")
    if not 0.0 <= target < 1.0:
        raise PrunePathError(f"target sparsity must be in [0, 1) (got {target})")
    prepare_model(model, device)
    ids = tokenize_text(tokenizer, calib_data, max_tokens)
    check_token_ids(model, ids)
    bos_id = int(tokenizer.bos_token_id) if tokenizer is not None and needs_bos(model, tokenizer) else None
    pad = pad_id(tokenizer) if tokenizer is not None else 0
    history: list[tuple[float, float]] = []

    def s_at(tau: float) -> float:
        with routing_scope(model, tau=tau):
            s = measure_sparsity(model, ids, window=window, bos_id=bos_id, pad=pad)
        history.append((tau, s))
        return s

    lo, hi = 1e-6, 1.0  # s(lo) is the sparsest (top-1), s(hi) the densest
    s_lo, s_hi = s_at(lo), s_at(hi)
    if target > s_lo + tol:
        raise PrunePathError(f"target s_FFN {target} is beyond reach: even τ→0 (one expert per token) gives "
                             f"{s_lo:.4f}; choose a target ≤ {s_lo:.3f}")
    best = min(history, key=lambda h: abs(h[1] - target))
    bar = tqdm(range(max_iter), desc=f"calibrating τ for s_FFN {target:.3f}", disable=not progress, leave=False)
    for _ in bar:
        if abs(best[1] - target) <= tol / 2:
            break
        if target < s_hi:  # sparser than wanted even at τ = 1: only τ > 1 (all experts) is denser
            best = (TAU_ALL, s_at(TAU_ALL))
            break
        mid = 0.5 * (lo + hi)
        s = s_at(mid)
        if s > target:
            lo = mid
        else:
            hi = mid
        best = min(history, key=lambda h: abs(h[1] - target))
        bar.set_postfix(tau=f"{mid:.4f}", s_ffn=f"{s:.4f}")
    bar.close()
    tau, s = best
    return {"tau": tau, "s_ffn": s, "target": target, "tol": tol, "within_tol": abs(s - target) <= tol,
            "tokens": int(ids.numel()), "iterations": len(history), "history": history}
