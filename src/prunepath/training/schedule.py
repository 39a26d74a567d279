"""Routing schedules: a stage hook per method, called before each step's forward to set routing.

PrunePath (PAPER.md §4): stage 1 is an all-expert warm-up at τ = ``TAU_ALL``; stage 2 lowers τ linearly from 1.0 to
τ_min over T rounds (a round is an equal share of the stage-2 steps, the last round runs at τ_min), or holds
τ_min fixed (the authors' release). Beyond the paper, ``sample`` draws each stage-2 step's τ at random over the
range the checkpoint will be used at (every expert with probability ``tau_all_prob``), so the one checkpoint is
trained for every τ it is swept over and not only for the last one.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from prunepath.routing.control import configure
from prunepath.routing.config import TAU_ALL, inner_split
from prunepath.routing.ffn import prunepath_modules
from prunepath.state import state_of

StageHook = Callable[..., None]
_HOOKS: dict[str, StageHook] = {}


def register_stage_hook(method: str, fn: StageHook) -> None:
    """Register ``fn(model, stage, step, total_steps, cfg)`` for ``method`` (stage 1 or 2; step counts from 0
    within the stage, ``total_steps`` is that stage's length)."""
    _HOOKS[method] = fn


def get_stage_hook(method: str) -> StageHook | None:
    return _HOOKS.get(method)


def scheduled_tau(stage: int, step: int, total_steps: int, cfg, tau_min: float | None = None) -> float:
    """τ at ``step`` of ``stage`` (pure function of the config)."""
    tau_min = cfg.tau_min if tau_min is None else tau_min
    if stage == 1:
        return cfg.tau_warmup
    if cfg.tau_schedule == "fixed":
        return tau_min
    if cfg.tau_schedule == "sample":
        every, u = _draw(cfg.seed, step)
        return TAU_ALL if every < cfg.tau_all_prob else cfg.tau_start + (tau_min - cfg.tau_start) * u
    rounds = max(1, min(cfg.tau_rounds, max(total_steps, 1)))
    if rounds == 1:
        return tau_min
    r = min(rounds - 1, (step * rounds) // max(total_steps, 1))
    return cfg.tau_start + (tau_min - cfg.tau_start) * r / (rounds - 1)


def inner_fraction(stage: int, step: int, cfg) -> float:
    """The in-expert fraction f of a training step (``inner_sparsity_max``): 0 in stage 1, else 0 with
    probability ``inner_off_prob`` and uniform in [0, inner_sparsity_max] otherwise; its own stream of draws,
    so τ's draws are those of a run without it."""
    if stage == 1 or not cfg.inner_sparsity_max:
        return 0.0
    off, u = _draw(int(cfg.seed) + 104_729, step)
    return 0.0 if off < cfg.inner_off_prob else float(cfg.inner_sparsity_max) * u


def _draw(seed: int, step: int) -> tuple[float, float]:
    """Two uniform numbers that depend only on (seed, step): a resumed run replays the same τ sequence, and every
    layer (and every process) of one step shares the draw."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step) + 7919)
    a, b = torch.rand(2, generator=g, dtype=torch.float64).tolist()
    return a, b


def resolve_layers(layers, num_layers: int) -> list[int]:
    return sorted({(int(i) + num_layers) % num_layers for i in layers if -num_layers <= int(i) < num_layers})


def layer_taus(stage: int, step: int, total_steps: int, cfg, num_layers: int) -> dict[int, float]:
    """Per-layer τ: dense layers stay at ``TAU_ALL``; layers with their own τ_min follow their own schedule."""
    out: dict[int, float] = {}
    if stage == 1:
        return out
    for layer, t_min in (cfg.layer_tau or {}).items():
        layer = int(layer) % num_layers
        out[layer] = t_min if t_min > 1 else scheduled_tau(stage, step, total_steps, cfg, tau_min=t_min)
    for layer in resolve_layers(cfg.dense_layers, num_layers):
        out[layer] = TAU_ALL
    return out


def prunepath_stage_hook(model: nn.Module, stage: int, step: int, total_steps: int, cfg) -> None:
    num_layers = state_of(model).config.num_layers
    configure(model, tau=scheduled_tau(stage, step, total_steps, cfg),
                        layer_tau=layer_taus(stage, step, total_steps, cfg, num_layers),
                        gate_offset=float(cfg.gate_offset), gates=bool(cfg.gates))
    f = inner_fraction(stage, step, cfg)
    for m in prunepath_modules(model):
        m.inner_fraction = inner_split(f, cfg.inner_mid_bias, m.gated) if f else None

