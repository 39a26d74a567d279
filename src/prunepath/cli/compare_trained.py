"""``prunepath compare-trained``: dense fine-tuning, PrunePath and LTE trained with the same tokens and settings,
evaluated side by side; rows appended to a resumable JSON file (API:
:func:`prunepath.pipeline.compare_trained.compare_trained_baselines`)."""

from __future__ import annotations

import argparse

from prunepath.cli.common import command_line, parse_floats
from prunepath.pipeline import compare_trained


def register(sub) -> None:
    p = sub.add_parser("compare-trained", help="trained side-by-side run: PrunePath vs LTE vs dense fine-tuning",
                       description=compare_trained.__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--display-name", default=None)
    p.add_argument("--train-file", required=True, help="JSON list of training documents")
    p.add_argument("--calib-file", required=True, help="JSON list of texts used to set τ / δ for target s_FFN")
    p.add_argument("--eval-data", required=True)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--stage1-steps", type=int, default=300)
    p.add_argument("--stage2-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tau-min", type=float, default=0.7)
    p.add_argument("--lte-etas", default="0.1,0.5,2.0")
    p.add_argument("--targets", default="0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    p.add_argument("--methods", default="dense,prunepath,lte")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    compare_trained.compare_trained_baselines(
        model=args.model, display_name=args.display_name, train_file=args.train_file, calib_file=args.calib_file,
        eval_data=args.eval_data, eval_tokens=args.eval_tokens, out=args.out, device=args.device,
        precision=args.precision, stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps,
        batch_size=args.batch_size, seq_len=args.seq_len, tau_min=args.tau_min,
        lte_etas=parse_floats(args.lte_etas, "--lte-etas"), targets=parse_floats(args.targets, "--targets"),
        methods=args.methods.split(","), calib_tokens=args.calib_tokens, command=command_line())
    return 0
