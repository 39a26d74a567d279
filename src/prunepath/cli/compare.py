"""``prunepath compare``: PrunePath and the baselines side by side on one model, backbone frozen (router fitting
only); rows appended to a resumable JSON file (API: :func:`prunepath.pipeline.compare.compare_baselines`)."""

from __future__ import annotations

import argparse

from prunepath.cli.common import add_device_arg, command_line, parse_floats
from prunepath.pipeline import compare


def register(sub) -> None:
    p = sub.add_parser("compare", help="side-by-side run of PrunePath and the baselines, backbone frozen (JSON rows)",
                       description=compare.__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default=compare.DEFAULT_OUT)
    p.add_argument("--eval-data", default=None,
                   help="evaluation text (default: DATA/wikitext-2/wiki.valid.raw under the shared data folder)")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--calib", default="mix:sotu,moby-dick,brown")
    p.add_argument("--calib-file", default=None, help="JSON list of calibration texts (instead of --calib)")
    p.add_argument("--display-name", default=None, help="exact model name for results (e.g. for a .gguf path)")
    add_device_arg(p)
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=200, help="router fitting steps per layer (every method)")
    p.add_argument("--batch", type=int, default=256, help="tokens per fitting step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--targets", default="0.3,0.5,0.7,0.9", help="target s_FFN values")
    p.add_argument("--lte-etas", default="0.05,0.2,1.0")
    p.add_argument("--lte-delta-sweep", default="0.2", help="η values whose δ is also swept to the targets")
    p.add_argument("--methods", default=",".join(compare.DEFAULT_METHODS))
    p.add_argument("--neurons-per-expert", type=int, default=32)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    compare.compare_baselines(
        model=args.model, out=args.out, eval_data=args.eval_data, eval_tokens=args.eval_tokens, calib=args.calib,
        calib_file=args.calib_file, display_name=args.display_name, device=args.device,
        calib_tokens=args.calib_tokens, seq_len=args.seq_len, steps=args.steps, batch=args.batch, lr=args.lr,
        targets=parse_floats(args.targets, "--targets"), lte_etas=parse_floats(args.lte_etas, "--lte-etas"),
        lte_delta_sweep=parse_floats(args.lte_delta_sweep, "--lte-delta-sweep", allow_empty=True),
        methods=args.methods.split(","), neurons_per_expert=args.neurons_per_expert, command=command_line())
    return 0
