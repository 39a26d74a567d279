"""Wanda (Sun et al., 2024): static unstructured weight pruning. Score |W_ij| · ‖X_j‖₂ (input feature norm over
calibration tokens); in every output row the lowest-scoring ``sparsity`` fraction of weights is zeroed.

FFN linears only by default (``scope="all"``: every linear layer except the LM head and routers). Works on dense
and converted models. The achieved weight sparsity is recorded as ``model.prunepath.static_sparsity`` and is what
results report as Wanda's s_FFN (as the paper does). Unstructured zeros give no kernel speed-up: none is claimed.

Simplification: one calibration pass over the dense model (the original prunes layer by layer, feeding each layer
the outputs of the already pruned ones).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from prunepath.baselines.calibration import run_batches, token_batches
from prunepath.errors import PrunePathError
from prunepath.conversion.moefy import prunepath_modules
from prunepath.models.adapters import adapter_for
from prunepath.models.arch import ffn_linears
from prunepath.state import state_of

SCOPES = ("ffn", "all")


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _weight_rows(m: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (a view: Conv1D stores [in, out])."""
    return m.weight.data if isinstance(m, nn.Linear) else m.weight.data.t()


def target_linears(model: nn.Module, scope: str = "ffn") -> dict[str, nn.Module]:
    """The linear layers Wanda prunes: the FFN's (default) or every one but the LM head and routers."""

    if scope not in SCOPES:
        raise PrunePathError(f"unknown Wanda scope {scope!r}; choose one of {', '.join(SCOPES)}")
    names = {id(m): n for n, m in model.named_modules()}
    if scope == "all":
        routers = {id(sub) for f in prunepath_modules(model) for sub in f.router.modules()}
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return {n: m for n, m in model.named_modules()
                if _is_linear(m) and id(m) not in routers and m is not out_emb}
    ffns = prunepath_modules(model)
    if ffns:
        mods = [lin for f in ffns for lin in (f.gate_proj, f.up_proj, f.down_proj) if lin is not None]
        return {names[id(m)]: m for m in mods}
    adapter = adapter_for(model)
    out: dict[str, nn.Module] = {}
    for site in adapter.sites(model):
        for path in ffn_linears(adapter.name):  # the architecture's facts: prunepath.models.arch.<family>
            m = site.owner.get_submodule(path)
            out[names[id(m)]] = m
    return out


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask [out, in]: per output row, the round(sparsity · in) lowest |W|·‖X‖ are dropped
    (ties: the lower input index is dropped first)."""
    if not 0.0 <= sparsity < 1.0:
        raise PrunePathError(f"Wanda sparsity must be in [0, 1) (got {sparsity})")
    score = weight.abs().float() * input_norm.float().to(weight.device).unsqueeze(0)
    n = int(round(sparsity * weight.shape[1]))
    keep = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    if n:
        drop = torch.sort(score, dim=1, stable=True).indices[:, :n]
        keep.scatter_(1, drop, False)
    return keep


def input_norms(model: nn.Module, modules: dict[str, nn.Module], batches: Sequence[torch.Tensor],
                progress: bool = True) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ over every calibration token for each input feature j of each module."""
    sums = {n: None for n in modules}

    def hook(name):
        def fn(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sq = (x * x).sum(0).cpu()
            sums[name] = sq if sums[name] is None else sums[name] + sq
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        run_batches(model, batches, desc="wanda: input norms", progress=progress)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, s in sums.items() if s is None]
    if missing:
        raise PrunePathError(f"Wanda saw no input for {missing[:3]}; is the model's forward skipping them?")
    return {n: s.sqrt() for n, s in sums.items()}


def weight_sparsity(model: nn.Module, scope: str = "ffn") -> float:
    """Fraction of exactly-zero weights in the ``scope`` linears (a measurement, not the request)."""
    mods = target_linears(model, scope)
    zeros = sum(int((m.weight == 0).sum()) for m in mods.values())
    total = sum(m.weight.numel() for m in mods.values())
    return zeros / max(total, 1)


@torch.no_grad()
def apply_wanda(model: nn.Module, tokenizer, calib_texts: Sequence[str], sparsity: float, *, scope: str = "ffn",
                max_tokens: int = 16384, seq_len: int = 256, progress: bool = True,
                norms: dict[str, torch.Tensor] | None = None) -> dict:
    """Prune ``model`` in place; returns {"sparsity": achieved, "scope", "modules", "norms"}. Pass ``norms``
    (from a previous call's result) to prune the same model copy again without re-running calibration."""
    if not 0.0 <= sparsity < 1.0:
        raise PrunePathError(f"Wanda sparsity must be in [0, 1) (got {sparsity}); e.g. 0.5 prunes half the weights")
    mods = target_linears(model, scope)
    if norms is None:
        norms = input_norms(model, mods, token_batches(tokenizer, calib_texts, seq_len=seq_len,
                                                        max_tokens=max_tokens), progress)
    pruned = total = 0
    for name, m in mods.items():
        w = _weight_rows(m)
        keep = wanda_mask(w, norms[name], sparsity)
        w.mul_(keep.to(w.dtype))
        pruned += int((~keep).sum())
        total += keep.numel()
    achieved = pruned / max(total, 1)
    state_of(model).static_sparsity = achieved
    state_of(model).static_method = f"wanda-{scope}"
    return {"sparsity": achieved, "scope": scope, "modules": len(mods), "norms": norms}
