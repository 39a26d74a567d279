"""``prunepath train``: joint training of backbone and routers (PAPER.md §4), or plain dense fine-tuning.

Settings come from a recipe (``--recipe recipes/paper-defaults.yaml``) and/or flags; flags win. Runs on CPU,
one GPU or ``accelerate launch`` (several GPUs) unchanged.
"""

from __future__ import annotations

import argparse
import json

from prunepath.errors import PrunePathError
from prunepath.cli.common import check_data_arg, check_data_source, check_model_arg, check_out_dir, parse_taus
from prunepath.state import state_of
from prunepath.training.config import TrainConfig, load_recipe
from prunepath.training.data import glue_num_labels
from prunepath.training.trainer import _write_json_atomic
from prunepath.training.trainer import train_from_config
import prunepath
from prunepath.routing.config import TAU_ALL
from prunepath.evaluation import perplexity

S = argparse.SUPPRESS  # flags not given do not override the recipe


def _kv_list(text: str) -> dict:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        if ":" not in item:
            raise PrunePathError(f"--layer-tau takes LAYER:TAU pairs like 0:0.95,29:0.9 (got {item!r})")
        k, v = item.split(":", 1)
        try:
            out[int(k)] = float(v)
        except ValueError as exc:
            raise PrunePathError(f"--layer-tau: bad pair {item!r} (want LAYER:TAU)") from exc
    return out


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise PrunePathError(f"--dense-layers takes comma-separated layer indices like 0,-1 (got {text!r})") from exc


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train routers and backbone (PrunePath schedule), or dense fine-tuning",
        description=f"Train a PrunePath model: stage 1 all-expert warm-up at τ={TAU_ALL}, stage 2 lowers τ to τ_min "
                    "(linear over rounds, or fixed). A plain model is converted first. Output: a "
                    "prunepath.load-able directory with a JSONL log and resumable checkpoints.",
        argument_default=S)
    g = p.add_argument_group("what to train")
    g.add_argument("--recipe", help="YAML/JSON file of settings (keys as below, with _); flags override it")
    g.add_argument("--model", help="built-in name, PrunePath checkpoint, model directory, .gguf or Hub id")
    g.add_argument("--task", choices=["lm", "classify", "instruct"])
    g.add_argument("--data", help="corpus name (sotu, moby-dick, brown, austen, kjv, mix, mix:a,b), text/JSON(L) "
                                  "file or folder, GLUE TSV (classify), Alpaca JSON / XSum JSONL (instruct), hf:NAME")
    g.add_argument("--glue-task", choices=["sst2", "mrpc", "rte", "cola"],
                   help="which GLUE task a --task classify file holds (when its path does not tell)")
    g.add_argument("--eval-data", help="evaluation data (default: the validation split / dev.tsv)")
    g.add_argument("--out", help="output directory (the trained model, log, checkpoints)")
    g.add_argument("--method", help="prunepath (default), dense (plain fine-tuning) or a registered baseline")
    g.add_argument("--method-param", action="append", dest="method_param", metavar="KEY=VALUE",
                   help="method-specific setting (repeatable; VALUE parsed as JSON when possible)")
    g = p.add_argument_group("conversion of a plain model")
    g.add_argument("--neurons-per-expert", type=int)
    g.add_argument("--num-experts", type=int)
    g.add_argument("--clustering", choices=["kmeans", "random", "coactivation"])
    g = p.add_argument_group("schedule and losses")
    g.add_argument("--stage1-steps", type=int, help=f"all-expert warm-up steps at τ={TAU_ALL} (default 100)")
    g.add_argument("--stage2-steps", type=int, help="sparse steps (default 100)")
    g.add_argument("--tau-min", type=float, help="final τ (default 0.7)")
    g.add_argument("--tau-schedule", choices=["linear", "fixed", "sample"],
                   help="linear (paper: 1.0 → τ_min in rounds), fixed (τ_min) or sample (each step draws τ in "
                        "[τ_min, 1], or every expert with --tau-all-prob)")
    g.add_argument("--tau-all-prob", type=float, help="sample schedule: share of steps with every expert (0.25)")
    g.add_argument("--inner-sparsity-max", type=float,
                   help="train with TEAL-style in-expert activation sparsity: each step zeroes the smallest fraction "
                        "f ~ U[0, this] of FFN inputs and intermediates inside active experts (default 0: off)")
    g.add_argument("--inner-off-prob", type=float, help="share of steps without in-expert sparsity (0.125)")
    g.add_argument("--inner-mid-bias", type=float,
                   help="shift the in-expert fraction from the FFN input to the intermediate: f_in = f(1-k), "
                        "f_mid = f(1+2k) on a gated FFN, same bytes (default 0; study round 7 uses 0.15, docs/training.md)")
    g.add_argument("--tau-rounds", type=int, help="rounds T of the linear schedule (default 10)")
    g.add_argument("--eta", type=float, help="entropy weight η (default 3e-4)")
    g.add_argument("--lam", "--lambda", dest="lam", type=float, help="balance weight λ (default 1e-3)")
    g.add_argument("--gamma", type=float, help="gate weight γ (default 0)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr-backbone", type=float)
    g.add_argument("--wd-backbone", type=float)
    g.add_argument("--lr-router", type=float)
    g.add_argument("--wd-router", type=float)
    g.add_argument("--lr-head", type=float)
    g.add_argument("--lr-scheduler", help="constant (default), linear, cosine, ...")
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping (0: off; default 1.0)")
    g.add_argument("--freeze-backbone", action="store_true", help="train the routers (and a new head) only")
    g.add_argument("--train-scope", choices=["all", "ffn"],
                   help="all (default) or ffn: attention, embeddings and norms stay as loaded")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--grad-accum", type=int)
    g.add_argument("--seq-len", type=int)
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto (default: GPU if present), cpu, cuda")
    g = p.add_argument_group("data")
    g.add_argument("--max-train-tokens", type=int, help="cap on training tokens (default: what the steps need)")
    g.add_argument("--max-eval-tokens", type=int)
    g.add_argument("--valid-fraction", type=float)
    g.add_argument("--text-field", help="JSON field holding the text (default: text)")
    g = p.add_argument_group("beyond the paper (FINDINGS.md)")
    g.add_argument("--gate-offset", type=float, help="logit offset inside the gate sigmoid (e.g. 4 → gates ≈1)")
    g.add_argument("--no-gates", dest="gates", action="store_false",
                   help="sum the selected experts unscaled: with every expert on (τ > 1) the router then need not run")
    g.add_argument("--warmstart-steps", type=int, help="router warm-start steps per layer (0: off)")
    g.add_argument("--warmstart-target", choices=["output_norm", "activation_mass"])
    g.add_argument("--warmstart-lr", type=float)
    g.add_argument("--warmstart-temperature", type=float)
    g.add_argument("--calib-tokens", type=int)
    g.add_argument("--dense-layers", type=_int_list, help="layers kept dense, e.g. 0,-1")
    g.add_argument("--auto-dense-layers", type=int, help="keep the k most τ-sensitive layers dense")
    g.add_argument("--layer-tau", type=_kv_list, help="per-layer τ_min, e.g. 0:0.95,29:0.9")
    g.add_argument("--always-on", type=int, help="always-on experts per layer (largest output norm)")
    g.add_argument("--distill", type=float, help="weight in [0, 1] of the KL to the frozen dense model's "
                   "next-token distribution (the task loss gets 1 − weight; 0: off)")
    g.add_argument("--distill-temperature", type=float, help="softmax temperature of --distill (default 1)")
    g.add_argument("--router-distill", type=float, help="weight of a KL from each token's true expert-output "
                   "shares (the warm-start target, on the current weights) to the router softmax (default 0)")
    g = p.add_argument_group("bookkeeping")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (0: only the final model)")
    g.add_argument("--keep-checkpoints", type=int)
    g.add_argument("--eval-every", type=int)
    g.add_argument("--log-every", type=int)
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--resume", nargs="?", const="auto", help="continue from the latest checkpoint in --out "
                                                             "(or from the given checkpoint directory)")
    g.add_argument("--ppl-data", help="after training, perplexity on this text file (e.g. "
                                      "wikitext-2/wiki.valid.raw, shipped with PrunePath)")
    g.add_argument("--ppl-tokens", type=int, help="tokens of --ppl-data to score (default 32768)")
    g.add_argument("--ppl-taus", help="comma-separated τ values for --ppl-data (default: the trained τ_min)")
    g.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    p.set_defaults(func=run)


NON_CONFIG = {"recipe", "func", "command", "method_param", "ppl_data", "ppl_tokens", "ppl_taus", "print_config"}


def resolve_config(args: argparse.Namespace):
    """TrainConfig from the recipe, then the flags given on the command line."""

    settings = load_recipe(args.recipe) if getattr(args, "recipe", None) else {}
    settings = {k.replace("-", "_"): v for k, v in settings.items()}
    flags = {k: v for k, v in vars(args).items() if k not in NON_CONFIG}
    if getattr(args, "method_param", None):
        params = dict(settings.get("method_params") or {})
        for item in args.method_param:
            if "=" not in item:
                raise PrunePathError(f"--method-param takes KEY=VALUE (got {item!r})")
            k, v = item.split("=", 1)
            try:
                params[k] = json.loads(v)
            except json.JSONDecodeError:
                params[k] = v
        flags["method_params"] = params
    settings.update(flags)
    return TrainConfig.from_dict(settings, where=getattr(args, "recipe", None) or "settings")


def check_before_load(cfg, args: argparse.Namespace) -> None:
    """Everything that can be checked without the model, checked before it loads."""

    check_model_arg(cfg.model)
    check_out_dir(cfg.out)
    check_data_source(cfg.data, cfg.task, "--data")
    check_data_source(cfg.eval_data, cfg.task, "--eval-data")
    if getattr(args, "ppl_taus", None):
        parse_taus(args.ppl_taus)
    if getattr(args, "ppl_tokens", 32768) < 2:
        raise PrunePathError(f"--ppl-tokens must be >= 2 (got {args.ppl_tokens})")
    check_data_arg(getattr(args, "ppl_data", None), "--ppl-data")


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if getattr(args, "print_config", False):
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if not cfg.out:
        raise PrunePathError("--out is required (the directory for the trained model, log and checkpoints)")
    check_before_load(cfg, args)
    if cfg.task == "classify":
        n = cfg.num_labels or glue_num_labels(cfg.data, cfg.glue_task)
        model, tok = prunepath.load_model(cfg.model, task="classify", num_labels=n)
    else:
        model, tok = prunepath.load_model(cfg.model)
    result = train_from_config(model, tok, cfg)
    summary = {k: v for k, v in result.to_dict().items() if k not in ("calibration",)}
    if getattr(args, "ppl_data", None) and cfg.task != "classify":
        summary["ppl_eval"] = ppl_eval(model, tok, args.ppl_data, getattr(args, "ppl_tokens", 32768),
                                       getattr(args, "ppl_taus", None), cfg)
        from pathlib import Path

        _write_json_atomic(Path(cfg.out) / "ppl_eval.json", summary["ppl_eval"])
    print(json.dumps(summary, indent=2, default=str))
    return 0


def ppl_eval(model, tok, data: str, max_tokens: int, taus: str | None, cfg) -> list[dict]:
    """Perplexity of the trained model on a text file at the trained routing (and at ``taus``)."""

    runs = []
    tau_list = parse_taus(taus) if taus and prunepath.is_converted(model) else [None]
    for tau in tau_list:
        if tau is None:
            res = perplexity.evaluate_perplexity(model, tok, data, max_tokens=max_tokens, progress=cfg.progress)
        else:
            with prunepath.routing(model, tau=tau):
                res = perplexity.evaluate_perplexity(model, tok, data, max_tokens=max_tokens, progress=cfg.progress)
        row = {k: res[k] for k in ("ppl", "nll", "tokens", "s_ffn", "window") if k in res}
        row.update(data=data, tau=tau if tau is not None else (
            state_of(model).config.routing.tau if prunepath.is_converted(model) else None))
        runs.append(row)
        print(f"[prunepath] ppl {row['ppl']:.2f}  s_FFN {row.get('s_ffn', 0):.3f}  at tau {row['tau']}", flush=True)
    return runs
