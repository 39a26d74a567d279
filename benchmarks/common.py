"""Helpers shared by benchmark scripts: machine description and atomic JSON output."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_cores": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def second_half_rate(log: list[dict]) -> tuple[float, float, int]:
    """(tokens/s, median seconds between records, intervals) over the second half of a ``train_log.jsonl``:
    past compilation, allocator warm-up and the stage 1 → 2 switch."""
    import statistics

    tail = log[len(log) // 2 - 1:]
    steps = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(tail, tail[1:])]
    tok_s = (tail[-1]["tokens"] - tail[0]["tokens"]) / (tail[-1]["elapsed_s"] - tail[0]["elapsed_s"])
    return tok_s, statistics.median(steps), len(steps)


def write_json(name: str, payload) -> Path:
    from prunepath.evaluation.reports import atomic_write_text

    return atomic_write_text(RESULTS / name, json.dumps(payload, indent=2) + "\n")
