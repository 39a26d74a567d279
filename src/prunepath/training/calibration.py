"""Calibration helpers for the options beyond the paper (FINDINGS.md §1): co-activation expert construction,
a router warm start, always-on experts and per-layer sensitivity. All run on a few thousand calibration tokens
with the backbone frozen."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from prunepath.calibration import (  # noqa: F401  (re-exported: shared calibration helpers)
    _capture_inputs, _model_inputs, calibration_batches)
from prunepath.calibration import capture_ffn_inputs as collect_ffn_inputs  # noqa: F401  (its old name here)
from prunepath.errors import PrunePathError
from prunepath.routing.ffn import output_shares
from prunepath.state import state_of
from prunepath.training.losses import router_distill_kl
from prunepath.conversion.moefy import prunepath_modules
from prunepath.models.adapters import adapter_for
from prunepath.routing.control import routing_scope
from prunepath.routing.config import TAU_ALL


@torch.no_grad()
def collect_ffn_activations(model: nn.Module, batches: Iterable[dict], max_tokens: int = 4096,
                            progress: bool = False) -> list[torch.Tensor]:
    """Per-layer dense intermediate activations [tokens, d_ff] of an unconverted model (for
    ``moefy(..., clustering="coactivation", calibration_activations=...)``)."""

    adapter = adapter_for(model)
    sites = adapter.sites(model)
    modules = [getattr(s.owner, s.attr) for s in sites]
    inputs = collect_ffn_inputs(model, modules, batches, progress)
    out = []
    for site, x in zip(sites, inputs):
        d = adapter.extract(site)
        x = x[:max_tokens].to(d.up_w.dtype).to(d.up_w.device)
        up = nn.functional.linear(x, d.up_w, d.up_b)
        if d.gated:
            h = d.activation(nn.functional.linear(x, d.gate_w, d.gate_b)) * up
        else:
            h = d.activation(up)
        out.append(h.float().cpu())
    return out


@torch.no_grad()
def expert_contributions(ffn, x: torch.Tensor, target: str = "output_norm", chunk: int = 512) -> torch.Tensor:
    """[tokens, E] size of each expert's ungated output ‖FFN_e(x)‖ ("output_norm") or its activation mass
    Σ|h| over its neurons ("activation_mass")."""
    e, n = ffn.num_experts, ffn.neurons_per_expert
    outs = []
    for i in range(0, x.shape[0], chunk):
        xs = x[i:i + chunk].to(ffn.up_proj.weight.device, ffn.up_proj.weight.dtype)
        if target == "activation_mass":
            outs.append(ffn.intermediate(xs).float().view(-1, e, n).abs().sum(-1))
        else:
            outs.append(ffn.expert_output_norms(xs, chunk))
    return torch.cat(outs).cpu()


def router_warmstart(model: nn.Module, batches: list[dict], steps: int, *, lr: float = 1e-2,
                     target: str = "output_norm", temperature: float = 1.0, progress: bool = True,
                     inputs: list[torch.Tensor] | None = None) -> list[float]:
    """Distil each expert's share of the true FFN output into the router softmax (KL), backbone frozen.

    Target per token: q_e ∝ c_e^(1/temperature) with c_e = ‖FFN_e(x)‖ (or activation mass), so the
    softmax ranks experts by what they actually contribute. Always-on experts are left out of the target and
    the softmax. Each layer's router is trained on cached FFN inputs with Adam; returns the final KL per layer.
    """

    ffns = prunepath_modules(model)
    if not ffns:
        raise PrunePathError("router warm start needs a converted model")
    xs = inputs if inputs is not None else collect_ffn_inputs(model, ffns, batches)
    final = []
    for ffn, x in tqdm(list(zip(ffns, xs)), desc="router warm start", disable=not progress, unit="layer"):
        c = expert_contributions(ffn, x, target)
        keep = ~ffn.always_on.cpu()
        q = output_shares(c[:, keep], temperature)
        xd = x.to(ffn.up_proj.weight.device)
        qd = q.to(xd.device)
        params = [p for p in ffn.router.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        kl = torch.tensor(0.0)
        for _ in range(steps):
            logits = ffn.router(xd.to(params[0].dtype)).float()[:, keep.to(xd.device)]
            kl = router_distill_kl(logits, qd)
            opt.zero_grad(set_to_none=True)
            kl.backward()
            opt.step()
        final.append(float(kl.detach()))
    return final


@torch.no_grad()
def select_always_on(model: nn.Module, batches: list[dict], k: int, *,
                     inputs: list[torch.Tensor] | None = None) -> list[list[int]]:
    """Mark, per layer, the ``k`` experts with the largest maximum output norm on calibration data (the
    "massive activation" experts) as always on. Returns the chosen expert ids per layer."""

    ffns = prunepath_modules(model)
    if k >= (ffns[0].num_experts if ffns else 1):
        raise PrunePathError(f"always_on={k} must be smaller than the number of experts per layer")
    xs = inputs if inputs is not None else collect_ffn_inputs(model, ffns, batches)
    chosen = []
    for ffn, x in zip(ffns, xs):
        c = expert_contributions(ffn, x, "output_norm")
        top = torch.topk(c.max(0).values, k).indices.sort().values
        ffn.always_on.zero_()
        ffn.always_on[top.to(ffn.always_on.device)] = True
        chosen.append(top.tolist())
    return chosen


@torch.no_grad()
def layer_sensitivity(model: nn.Module, batches: list[dict], tau: float, progress: bool = True) -> list[float]:
    """Increase of the LM loss (nats/token) when only layer l is sparse at ``tau``, for every layer."""

    device = next(model.parameters()).device
    num_layers = state_of(model).config.num_layers

    def loss() -> float:
        tot, n = 0.0, 0
        for b in batches:
            out = model(**_model_inputs(b, device), labels=b["labels"].to(device))
            k = int((b["labels"][:, 1:] != -100).sum())
            tot += float(out.loss) * k
            n += k
        return tot / max(n, 1)

    was_training = model.training
    model.eval()
    dense = {i: TAU_ALL for i in range(num_layers)}
    with routing_scope(model, tau=TAU_ALL, layer_tau={}):
        base = loss()
    out = []
    for layer in tqdm(range(num_layers), desc="layer sensitivity", disable=not progress, unit="layer"):
        lt = dict(dense)
        lt[layer] = tau
        with routing_scope(model, tau=TAU_ALL, layer_tau=lt):
            out.append(loss() - base)
    model.train(was_training)
    return out
