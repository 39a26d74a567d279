"""``prunepath info``: describe a PrunePath checkpoint without loading its weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from prunepath.checkpoint import read_config


def register(sub) -> None:
    p = sub.add_parser("info", help="show a checkpoint's architecture, experts and routing settings")
    p.add_argument("path", help="PrunePath checkpoint directory")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    meta = read_config(args.path)
    hf = json.loads((Path(args.path) / "config.json").read_text())
    info = {
        "path": str(Path(args.path).resolve()),
        "model": meta.get("source_display_name") or meta.get("source_model"),
        "architecture": meta.get("model_class"),
        "model_type": hf.get("model_type"),
        "adapter": meta.get("adapter"),
        "layers": meta.get("num_layers"),
        "experts_per_layer": meta.get("num_experts"),
        "neurons_per_expert": meta.get("neurons_per_expert"),
        "clustering": meta.get("clustering"),
        "router": meta.get("router", "linear"),
        "routing": meta.get("routing"),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0
