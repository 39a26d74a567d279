"""Top-k reconstruction (PAPER.md §6): at every FFN keep only each router's top-k experts and measure the MSE to
the all-expert output, for k = 1, 2, 4, …, E. Works for any router / routing method (baselines included):
experts are ranked by the router's scores and weighted by the method's own weights with every expert active.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm

from prunepath.errors import PrunePathError
from prunepath.evaluation.common import check_token_ids, prepare_model
from prunepath.routing.methods import get_method
from prunepath.conversion.moefy import prunepath_modules
from prunepath.evaluation.perplexity import tokenize_text
from prunepath.routing.config import TAU_ALL


def default_ks(num_experts: int) -> list[int]:
    ks, k = [], 1
    while k < num_experts:
        ks.append(k)
        k *= 2
    return ks + [num_experts]


def _all_expert_weights(ffn, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The method's per-expert weights with every expert active, or unit weights where the method cannot say
    (it raises, or does not keep every expert). Returns (weights, used_method) with ``used_method`` a bool
    tensor on ``scores.device``: no host sync here, so the caller decides when to read it."""
    r = ffn.routing
    dense = replace(r, tau=TAU_ALL, rule="all", k=None, layer_tau={})
    unit = torch.ones_like(scores, dtype=torch.float32)
    try:
        w, mask = get_method(r.method)(scores, dense, ffn.layer_index, ffn.always_on)
    except PrunePathError:
        w, mask = None, None
    if w is None:
        return unit, torch.zeros((), dtype=torch.bool, device=scores.device)
    ok = mask.all()
    return torch.where(ok, w.float(), unit), ok


@torch.inference_mode()
def _layer_errors(ffn, x: torch.Tensor, ks: list[int], chunk: int = 256
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum of squared errors per k (float64, [K]) over the rows of x [T, d], Σ‖y_all‖² (float64 scalar) and
    whether the method's own weights were used in every chunk (bool scalar). Every tensor lives on ``x.device``
    (the model's device): no cuda/cpu mix and no host sync."""
    e, n = ffn.num_experts, ffn.neurons_per_expert
    sse = torch.zeros(len(ks), dtype=torch.float64, device=x.device)
    ref = torch.zeros((), dtype=torch.float64, device=x.device)
    used = torch.ones((), dtype=torch.bool, device=x.device)
    dt = torch.promote_types(x.dtype, torch.float32)  # at least fp32 for the error sums
    w_down = ffn.down_proj.weight.to(dt).t().reshape(e, n, -1)  # [E, n, d]
    k_idx = torch.tensor([k - 1 for k in ks], device=x.device)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        scores = ffn.router(xs).to(dt)
        w, ok = _all_expert_weights(ffn, scores)
        used &= ok
        w = w.to(dt)
        h = ffn.intermediate(xs).to(dt).view(-1, e, n)
        contrib = torch.einsum("ten,end->ted", h, w_down) * w.unsqueeze(-1)  # [t, E, d]
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        ranked = torch.gather(contrib, 1, order.unsqueeze(-1).expand_as(contrib))
        partial = ranked.cumsum(1)  # partial[:, k-1] = output of the top-k experts
        full = partial[:, -1:]
        err = (partial[:, k_idx] - full).double().pow(2).sum(dim=(0, 2))
        sse += err
        ref += full.double().pow(2).sum()
    return sse, ref, used


def topk_reconstruction(
    model: nn.Module,
    tokenizer,
    data: str | os.PathLike | list[int] | torch.Tensor,
    ks: list[int] | None = None,
    *,
    max_tokens: int = 2048,
    window: int = 512,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[dict]:
    """One row per k: ``mse`` (mean over tokens, layers and hidden units of (y_topk − y_all)²), ``rel_mse``
    (divided by the mean y_all²) and ``per_layer_mse``. FFN inputs come from a forward pass of the model with
    its current routing (use τ > 1 for all-expert inputs)."""

    ffns = prunepath_modules(model)
    if not ffns:
        raise PrunePathError("top-k reconstruction needs a converted model (prunepath.moefy or a checkpoint)")
    e = ffns[0].num_experts
    ks = default_ks(e) if ks is None else sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1 or ks[-1] > e:
        raise PrunePathError(f"every k must be between 1 and the number of experts ({e}); got {ks}")
    dev = prepare_model(model, device)
    ids = tokenize_text(tokenizer, data, max_tokens) if not isinstance(data, torch.Tensor) else data[:max_tokens]
    check_token_ids(model, ids)
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(ffns))}

    def make_hook(i):
        def hook(module, args):
            captured[i].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        return hook

    handles = [f.register_forward_pre_hook(make_hook(i)) for i, f in enumerate(ffns)]
    sse = torch.zeros(len(ffns), len(ks), dtype=torch.float64)
    ref = torch.zeros(len(ffns), dtype=torch.float64)
    count = 0
    used = True
    try:
        for s in tqdm(range(0, ids.numel(), window), desc="top-k reconstruction", disable=not progress,
                      leave=False):
            x = ids[s:s + window].unsqueeze(0).to(dev)
            model(input_ids=x, use_cache=False)
            for i, f in enumerate(ffns):
                err, r, ok = _layer_errors(f, captured[i].pop(), ks)
                sse[i] += err.cpu()  # the accumulators stay on the host, whatever the model's device
                ref[i] += r.cpu()
                used = used and bool(ok.cpu())
            count += x.numel()
    finally:
        for h in handles:
            h.remove()
    d = ffns[0].hidden_size
    per_layer = sse / (count * d)  # [L, K]
    ref_ms = float(ref.sum() / (count * d * len(ffns)))
    how = "method" if used else "unit"
    rows = []
    for j, k in enumerate(ks):
        mse = float(per_layer[:, j].mean())
        rows.append({"k": k, "mse": mse, "rel_mse": mse / ref_ms if ref_ms else float("nan"),
                     "per_layer_mse": per_layer[:, j].tolist(), "tokens": count, "num_experts": e,
                     "weighting": how, "method": ffns[0].routing.method})
    return rows
