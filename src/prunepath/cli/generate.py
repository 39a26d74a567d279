"""``prunepath generate``: continue a prompt with the fast decode engine (CUDA) or the PyTorch path."""

from __future__ import annotations

import argparse
import sys
import time

from prunepath.cli.common import add_device_arg, add_inner_args, add_model_arg, apply_inner_args, check_inner_args
from prunepath.cli.allocate import check_calib_source
from prunepath.cli.common import TAU_HELP, check_min, check_model_arg, check_tau, resolve_device
from prunepath.decoding import generate
from prunepath.errors import PrunePathError
from prunepath.kernels._common import interpreting
from prunepath.models.arch import max_positions
from prunepath.state import state_of
import prunepath


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text (static KV cache + CUDA graph + sparse FFN kernels on GPU)")
    add_model_arg(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--tau", type=float, default=None, help=f"{TAU_HELP}; for this run; default: the checkpoint's")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), > 0 samples")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--kernels", choices=("auto", "triton", "torch"), default="auto",
                   help="auto: Triton engine on CUDA, PyTorch elsewhere; triton needs --device cuda or "
                        "TRITON_INTERPRET=1; torch: the model's own generate")
    p.add_argument("--ffn", choices=("auto", "sparse", "dense"), default="auto",
                   help="FFN path of the engine (auto: sparse kernels at batch 1 unless every expert is active, else cuBLAS "
                        "over every expert with the router's gates)")
    add_inner_args(p)
    p.add_argument("--calib-data", default=None,
                   help="--inner-sparsity: calibration text (a registry corpus, mix:..., or a text file)")
    p.add_argument("--calib-tokens", type=int, default=4096, help="--inner-sparsity: calibration tokens (4096)")
    add_device_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise PrunePathError("--max-new-tokens must be >= 1")
    check_model_arg(args.model)
    check_tau(args.tau)
    check_inner_args(args)
    check_min(args, 2, "calib_tokens")
    check_calib_source(args.calib_data)
    if not args.temperature >= 0:
        raise PrunePathError(f"--temperature must be >= 0 (0 = greedy; got {args.temperature})")
    device = resolve_device(args.device)
    if args.kernels == "triton" and device.type != "cuda":
        if not interpreting():
            raise PrunePathError("--kernels triton needs a GPU: use --device cuda (or set TRITON_INTERPRET=1 to "
                                 "run the Triton kernels on the CPU, slowly)")
    dtype = "bfloat16" if device.type == "cuda" else None
    # With the engine on a GPU, the model itself can stay in host memory: the engine keeps its own
    # (packed) copy of every weight it needs on the device, so GPU memory holds one copy, not two.
    engine_on_gpu = device.type == "cuda" and args.kernels != "torch"
    model, tok = prunepath.load_model(args.model, dtype=dtype, device="cpu" if engine_on_gpu else str(device))
    if tok is None:
        raise PrunePathError(f"{args.model} has no tokenizer; pass a model directory that includes one")
    model.eval()
    if args.inner_sparsity is not None and state_of(model).config is None:
        raise PrunePathError("--inner-sparsity needs a converted model (a PrunePath checkpoint); for the original "
                             "model use TEAL: prunepath baseline --method teal")
    window = min(512, max_positions(model.config) or 512)
    apply_inner_args(model, tok, args, window=window)  # decoded by the threshold or the expert kernels
    t0 = time.perf_counter()
    text = generate(model, tok, args.prompt, args.max_new_tokens, tau=args.tau, temperature=args.temperature,
                    device=device, kernels=args.kernels, ffn=args.ffn, seed=args.seed)
    dt = time.perf_counter() - t0
    print(text)
    print(f"[{state_of(model).display_name} · {device} · {dt:.2f} s]", file=sys.stderr)
    return 0
