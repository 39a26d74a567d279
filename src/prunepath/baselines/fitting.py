"""Fitting routers with the backbone frozen, on cached FFN inputs (no trainer needed).

Methods:
- "moefication": MLP router, BCE to the max-normalised expert activation mass (MoEfication).
- "d2dmoe": MLP router regressing each expert's output norm, MSE (D2DMoE).
- "prunepath": the paper's linear router, KL from each expert's share of the output norm to softmax(logits)
  (a router warm start; the paper trains router and backbone jointly, which this is not).
- "lte": a *layer-local proxy* of LTE's stage 1: the soft output Σ_e sigmoid(g_e)·FFN_e(x) is fitted to the
  dense FFN output (relative MSE) instead of the task loss, plus η·L_eff + μ·L_sep. For when joint training
  with the trainer is out of budget; say so wherever its numbers appear.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunepath.baselines import lte as lte_mod
from prunepath.baselines.calibration import collect_ffn_inputs, expert_mass, expert_output_norms, token_batches
from prunepath.baselines.moefication import moefication_targets
from prunepath.errors import PrunePathError
from prunepath.conversion.moefy import prunepath_modules
from prunepath.routing.control import configure
from prunepath.routing.control import set_router

FIT_METHODS = ("moefication", "d2dmoe", "prunepath", "lte")
_ROUTER_KIND = {"moefication": "moefication", "d2dmoe": "d2dmoe", "prunepath": "linear", "lte": "lte"}


def _targets(ffn: nn.Module, x: torch.Tensor, method: str, chunk: int = 2048) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for part in x.split(chunk):
            if method == "moefication":
                out.append(moefication_targets(expert_mass(ffn, part)))
            else:
                out.append(expert_output_norms(ffn, part))
    t = torch.cat(out)
    if method == "d2dmoe":
        t = t / t.mean().clamp_min(1e-12)  # per-layer scale; the (1 − τ)·max rule is scale-free
    elif method == "prunepath":
        t = t / t.sum(-1, keepdim=True).clamp_min(1e-12)  # each expert's share of the output norm
    return t


def _lte_local_loss(ffn: nn.Module, x: torch.Tensor, scores: torch.Tensor, params: dict) -> torch.Tensor:
    with torch.no_grad():
        h = ffn.intermediate(x).float()
        y = h @ ffn.down_proj.weight.float().t()
    s = torch.sigmoid(scores.float())
    hs = (h.view(*h.shape[:-1], ffn.num_experts, -1) * s.unsqueeze(-1)).view_as(h)
    y_hat = hs @ ffn.down_proj.weight.float().t()
    rec = ((y_hat - y) ** 2).sum(-1).mean() / (y ** 2).sum(-1).mean().clamp_min(1e-12)
    delta = float(params.get("threshold", lte_mod.DEFAULT_THRESHOLD))
    return (rec + float(params.get("eta", lte_mod.DEFAULT_ETA)) * lte_mod.efficiency_loss(s)
            + float(params.get("sep_weight", lte_mod.DEFAULT_SEP_WEIGHT))
            * lte_mod.separability_loss(s, delta, float(params.get("sep_eps", lte_mod.DEFAULT_SEP_EPS))))


def fit_router(
    model: nn.Module,
    tokenizer=None,
    texts: Sequence[str] | None = None,
    *,
    method: str = "moefication",
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 512,
    max_tokens: int = 16384,
    seq_len: int = 256,
    seed: int = 0,
    inputs: list[torch.Tensor] | None = None,
    router_kwargs: dict | None = None,
    params: dict | None = None,
    progress: bool = True,
) -> dict:
    """Give every PrunePath FFN a fresh router of ``method``'s kind and fit it with the backbone frozen.

    ``inputs`` (per-layer cached FFN inputs from :func:`collect_ffn_inputs`) skips the calibration pass, so
    several methods can share the same tokens. ``params`` holds LTE-proxy settings (eta, sep_weight,
    threshold). Routing is switched to ``method`` afterwards (its sparsity knob still has to be set: k for
    MoEfication, τ for D2DMoE / PrunePath, δ for LTE). Returns {"final_loss": per layer, "tokens": n}.
    """

    if method not in FIT_METHODS:
        raise PrunePathError(f"fit_router: unknown method {method!r}; choose one of {', '.join(FIT_METHODS)}")
    if steps < 1 or lr <= 0 or batch_size < 1:
        raise PrunePathError(f"fit_router needs steps >= 1, lr > 0, batch_size >= 1 (got {steps}, {lr}, {batch_size})")
    mods = prunepath_modules(model)
    if not mods:
        raise PrunePathError("fit_router needs a converted model: run prunepath.moefy(model) first")
    if inputs is None:
        if tokenizer is None or not texts:
            raise PrunePathError("fit_router needs calibration text (tokenizer + texts) or cached inputs=")
        inputs = collect_ffn_inputs(model, token_batches(tokenizer, texts, seq_len=seq_len, max_tokens=max_tokens),
                                    progress=progress)
    if len(inputs) != len(mods):
        raise PrunePathError(f"got inputs for {len(inputs)} layers but the model has {len(mods)} FFNs")
    set_router(model, _ROUTER_KIND[method], **(router_kwargs or {}))
    params = dict(params or {})
    gen = torch.Generator().manual_seed(seed)
    losses = []
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for ffn, x_all in tqdm(list(zip(mods, inputs)), desc=f"fitting {method} routers", disable=not progress,
                               unit="layer"):
            router = ffn.router
            router.requires_grad_(True)
            if method == "moefication":
                router.init_from_centroids(ffn)
            dev, dt = ffn.up_proj.weight.device, ffn.up_proj.weight.dtype
            x_all = x_all.to(dev, dt)
            targets = _targets(ffn, x_all, method) if method != "lte" else None
            opt = torch.optim.Adam(router.parameters(), lr=lr)
            n = x_all.shape[0]
            loss = torch.zeros(())
            for _ in range(steps):
                idx = torch.randint(n, (min(batch_size, n),), generator=gen).to(dev)
                x = x_all[idx]
                scores = router(x).float()
                if method == "moefication":
                    loss = F.binary_cross_entropy_with_logits(scores, targets[idx])
                elif method == "d2dmoe":
                    loss = F.mse_loss(scores, targets[idx])
                elif method == "prunepath":
                    loss = F.kl_div(F.log_softmax(scores, -1), targets[idx], reduction="batchmean")
                else:
                    loss = _lte_local_loss(ffn, x, scores, params)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            router.requires_grad_(False)
            losses.append(float(loss.detach()))
    finally:
        for p, rg in frozen:
            p.requires_grad_(rg)
    if method == "lte":
        configure(model, method="lte",
                  params={"soft": False, "threshold": float(params.get("threshold", lte_mod.DEFAULT_THRESHOLD))})
    elif method == "prunepath":
        configure(model, method="prunepath", rule="cumulative", gates=False)
    else:
        configure(model, method=method)
    return {"final_loss": losses, "tokens": int(inputs[0].shape[0])}
