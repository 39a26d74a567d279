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


def write_json(name: str, payload) -> Path:
    from prunepath.evaluation.reports import atomic_write_text

    return atomic_write_text(RESULTS / name, json.dumps(payload, indent=2) + "\n")
