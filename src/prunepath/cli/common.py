"""Argument helpers shared by sub-commands."""

from __future__ import annotations

import argparse
import sys

import torch

from prunepath.errors import PrunePathError
from prunepath.models.registry import BUILTIN_MODELS, DEFAULT_MODEL
from prunepath.data.corpora import is_corpus_name
from prunepath.evaluation.common import check_text_file, resolve_data_path
from prunepath.models.registry import check_builtin_typo
from prunepath.evaluation.inner import ALLOCATIONS as INNER_ALLOCATIONS
from prunepath.evaluation.inner import apply_inner, collect_inner_stats, inner_spec
from prunepath.routing.config import TAU_ALL, TAU_SWEEP_MAX, is_valid_tau, validate_mid_bias, validate_sparsity_fraction


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
    bad = [t for t in taus if not is_valid_tau(t, TAU_SWEEP_MAX)]
    if not taus or bad:
        raise PrunePathError(f"every τ must be in (0, 2] ({TAU_ALL} keeps all experts); got {text!r}")
    return taus


def parse_floats(text: str, flag: str, *, allow_empty: bool = False) -> list[float]:
    """A comma-separated list of numbers (``--targets 0.3,0.5``); ``allow_empty`` skips empty items (and so
    accepts an empty list)."""
    items = text.split(",")
    try:
        return [float(t) for t in items if t or not allow_empty]
    except ValueError as exc:
        raise PrunePathError(f"{flag} must be a comma-separated list of numbers (got {text!r})") from exc


def command_line() -> str:
    """The command as typed (``prunepath SUBCOMMAND ...``), for the records a command writes."""
    return "prunepath " + " ".join(sys.argv[1:])


# What --tau means, said once for every command that takes it (eval, generate, convert; each adds its default).
TAU_HELP = ("τ, the PrunePath routing budget of a converted model: each token keeps its most probable experts "
            "while their cumulative probability stays below τ (τ > 0; τ > 1 keeps every expert)")


# ---- checks made before any model is loaded (a bad argument fails in a second, not after the load) ----------

def check_tau(value: float | None, flag: str = "--tau") -> None:
    """τ must be a positive finite number (τ > 1 keeps every expert)."""
    import math

    if value is not None and not (math.isfinite(value) and value > 0):
        raise PrunePathError(f"{flag} must be > 0 (got {value:g}); τ is the cumulative routing budget: 0.7 keeps "
                             "the experts holding about 70% of the probability, τ > 1 keeps every expert")


def check_min(args: argparse.Namespace, minimum: int | float, *names: str) -> None:
    """Each option ``names`` (attribute names) that was given must be >= ``minimum``."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise PrunePathError(f"--{name.replace('_', '-')} must be >= {minimum:g} (got {value:g})")


def check_data_arg(path: str | None, flag: str = "--data") -> None:
    """A data file argument: it exists (as given or under a data folder), is not empty, and is text."""

    if path is None or str(path).startswith("hf:"):
        return
    p = resolve_data_path(path)
    if p.is_dir():
        raise PrunePathError(f"{flag} {path} is a directory; pass a file")
    if p.stat().st_size == 0:
        raise PrunePathError(f"{flag} {p} is empty; pass a file with content")
    check_text_file(p)


def check_model_arg(name: str | None, flag: str = "--model") -> None:
    """A misspelled built-in name fails here, before anything is loaded (``smollm2-135`` → smollm2-135m)."""

    if name is not None:
        try:
            check_builtin_typo(str(name))
        except PrunePathError as exc:
            raise PrunePathError(f"{flag}: {exc}") from None


def check_out_dir(out: str | None, flag: str = "--out", checkpoint: bool = False) -> None:
    """An output directory argument must not name an existing file; a checkpoint directory (``checkpoint``)
    may exist only empty or as a PrunePath checkpoint (which the save replaces)."""
    from pathlib import Path

    if out is None:
        return
    p = Path(out).expanduser()
    if p.is_file():
        raise PrunePathError(f"{flag} {out} is an existing file; {flag} names a directory")
    if checkpoint and p.is_dir() and any(p.iterdir()) and not (p / "prunepath_config.json").exists():
        raise PrunePathError(f"{flag} {out} exists and is not a PrunePath checkpoint; choose another output path "
                             "(or an empty directory)")


def check_data_source(source: str | None, task: str, flag: str) -> None:
    """A training / evaluation data argument that names a file or folder must exist (and a file be text).
    Corpus names, ``mix:...``, ``hf:...`` and other ``scheme:`` sources are checked where they are read."""
    from pathlib import Path

    if not source or is_corpus_name(str(source)):
        return
    p = Path(str(source)).expanduser()
    if not p.exists() and ":" in str(source):
        return  # hf:NAME and other named sources
    if task == "lm":  # raw text: a file or a folder of .txt files, as given
        if not p.exists():
            raise PrunePathError(f"{flag} {source}: no such data file or directory. Named corpora: sotu, "
                                 "moby-dick, brown, austen, kjv, mix (mix:a,b); Hugging Face datasets: hf:NAME")
        if p.is_file() and p.stat().st_size:
            check_text_file(p)
    else:
        check_data_arg(str(source), flag)


def check_baseline_args(args: argparse.Namespace) -> None:
    """``prunepath baseline``: every option checked before the model loads."""
    check_model_arg(args.model)
    check_out_dir(args.out, checkpoint=True)
    sparsity = getattr(args, "sparsity", None)
    if args.method in ("static", "wanda") and sparsity is not None and not 0 <= sparsity < 1:
        raise PrunePathError(f"--sparsity must be in [0, 1) (got {sparsity})")
    check_min(args, 1, "calib_tokens", "fit_steps", "k", "neurons_per_expert")
    check_tau(getattr(args, "tau", None))
    check_tau(getattr(args, "threshold", None), "--threshold")
    check_data_source(getattr(args, "calib_data", None), "lm", "--calib-data")


def add_inner_args(p: argparse.ArgumentParser) -> None:
    """In-expert (TEAL-style) thresholds calibrated on --calib-data (eval, generate)."""
    p.add_argument("--inner-sparsity", type=float, default=None, metavar="F",
                   help="in-expert (TEAL-style) thresholds: zero the smallest fraction F of FFN inputs and of "
                        "intermediates inside the active experts, calibrated on --calib-data (required; never the "
                        "evaluation text); 0 clears thresholds stored in the checkpoint. See docs/evaluation.md")
    p.add_argument("--inner-allocation", choices=list(INNER_ALLOCATIONS), default="uniform",
                   help="--inner-sparsity: F bytes per layer split between inputs and intermediates by a fixed "
                        "rule (uniform, with --inner-mid-bias) or by TEAL's block-wise greedy per layer (block)")
    p.add_argument("--inner-mid-bias", type=float, default=0.0, metavar="K",
                   help="--inner-sparsity with uniform allocation: inputs at F(1-K), intermediates at F(1+2K) "
                        "(gated FFN; the same bytes); use the value the checkpoint was trained with (default 0)")


def check_inner_args(args: argparse.Namespace) -> None:
    f = getattr(args, "inner_sparsity", None)
    if f is None or f == 0:
        return
    validate_sparsity_fraction(f, "--inner-sparsity")
    validate_mid_bias(getattr(args, "inner_mid_bias", 0.0), "--inner-mid-bias (the in-expert mid bias)")
    if not getattr(args, "calib_data", None):
        raise PrunePathError("--inner-sparsity calibrates thresholds and needs --calib-data, text that is not the "
                             "evaluation text (e.g. mix:sotu,moby-dick,austen,brown or a text file)")


def apply_inner_args(model, tok, args: argparse.Namespace, window: int = 512) -> dict | None:
    """Calibrate (on ``window``-token windows) and set, or with 0 clear, the in-expert thresholds; returns the spec
    (None when untouched)."""
    f = getattr(args, "inner_sparsity", None)
    if f is None:
        return None
    if f == 0:
        return apply_inner(model, None)
    stats = collect_inner_stats(model, tok, args.calib_data, max_tokens=args.calib_tokens, window=window,
                                progress=not getattr(args, "no_progress", False))
    spec = apply_inner(model, inner_spec(stats, f, mid_bias=args.inner_mid_bias, allocation=args.inner_allocation,
                                         model=model))
    print(f"in-expert thresholds ({args.inner_allocation}) for fraction {f:g} calibrated on {stats.tokens} tokens "
          f"of {args.calib_data}", file=sys.stderr)
    return spec
