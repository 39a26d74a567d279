"""Argument helpers shared by sub-commands."""

from __future__ import annotations

import argparse

import torch

from prunepath.errors import PrunePathError
from prunepath.models.registry import BUILTIN_MODELS, DEFAULT_MODEL


def add_model_arg(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--model", default=None if required else DEFAULT_MODEL, required=required,
                   help=f"built-in name ({', '.join(BUILTIN_MODELS)}), a PrunePath checkpoint, a local model "
                        f"directory, a .gguf file or a Hub id (default: {DEFAULT_MODEL})")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")


def resolve_device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PrunePathError(f"--device {name} asked for a GPU but none is available here; use --device cpu")
    return dev


def parse_taus(text: str) -> list[float]:
    try:
        taus = [float(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as exc:
        raise PrunePathError(f"--taus must be a comma-separated list of numbers (got {text!r})") from exc
    bad = [t for t in taus if not t > 0 or t > 2]
    if not taus or bad:
        raise PrunePathError(f"every τ must be in (0, 2] (1.05 keeps all experts); got {text!r}")
    return taus
