"""``prunepath convert``: turn a model's FFNs into PrunePath experts and save a checkpoint."""

from __future__ import annotations

import argparse

from prunepath.cli.common import (TAU_HELP, add_model_arg, check_min, check_model_arg, check_out_dir,
                                  check_tau)
from prunepath.state import state_of
import prunepath
from prunepath.routing.config import TAU_ALL


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a model's FFNs into experts + router and save a checkpoint",
                       description="Cluster every FFN into equal-size experts (balanced k-means), add a "
                                   "zero-initialised router and save a PrunePath checkpoint directory.")
    add_model_arg(p)
    p.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--neurons-per-expert", type=int, default=None, help="neurons per expert (default 32)")
    g.add_argument("--num-experts", type=int, default=None, help="experts per FFN (instead of --neurons-per-expert)")
    p.add_argument("--clustering", default="kmeans", choices=["kmeans", "random"],
                   help="expert construction (default: balanced k-means of normalised W_gate/W_1 rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tau", type=float, default=TAU_ALL,
                   help=f"{TAU_HELP}; stored in the checkpoint (default {TAU_ALL})")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_model_arg(args.model)
    check_min(args, 1, "neurons_per_expert", "num_experts")
    check_tau(args.tau)
    check_out_dir(args.out, checkpoint=True)
    model, tok = prunepath.load_model(args.model)
    npe = args.neurons_per_expert if args.num_experts is None and args.neurons_per_expert is not None else (
        None if args.num_experts is not None else 32)
    prunepath.moefy(model, neurons_per_expert=npe, num_experts=args.num_experts, seed=args.seed,
                    clustering=args.clustering, routing=prunepath.RoutingConfig(tau=args.tau),
                    progress=args.progress)
    out = prunepath.save(model, args.out, tokenizer=tok)
    cfg = state_of(model).config
    print(f"saved {out}: {cfg.num_layers} layers x {cfg.num_experts} experts of {cfg.neurons_per_expert} neurons")
    return 0
