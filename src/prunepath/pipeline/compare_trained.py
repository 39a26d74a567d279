"""Trained side-by-side run: PrunePath (one checkpoint, τ swept at inference) vs LTE (one checkpoint per η, δ
swept at inference) vs dense fine-tuning, all through ``prunepath.training.trainer.train`` with the same
training tokens, steps, optimiser settings and precision; evaluated by the same perplexity code. Rows are
appended to a JSON file as they come (temp name, then renamed).

    python -m prunepath.pipeline.compare_trained --model PATH.gguf --train-file train.json \\
        --calib-file calib.json --eval-data wiki.valid.raw --device cuda --out results.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from prunepath.state import state_of
import prunepath
from prunepath.baselines import prepare_for_training
from prunepath.baselines.calibration import collect_ffn_inputs, token_batches
from prunepath.pipeline.compare import Results
from prunepath.baselines.knobs import knob_for_sparsity
from prunepath.data.lm import build_lm_dataset
from prunepath.training.config import TrainConfig
from prunepath.training.trainer import train
from prunepath.routing.config import TAU_ALL
from prunepath.evaluation import perplexity


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    a = p.parse_args(argv)

    t0 = time.time()
    targets = [float(t) for t in a.targets.split(",")]
    base, tok = prunepath.load_model(a.model)
    if a.display_name:
        state_of(base).display_name = a.display_name
    docs = json.loads(Path(a.train_file).read_text())
    calib = json.loads(Path(a.calib_file).read_text())
    steps = a.stage1_steps + a.stage2_steps
    data = build_lm_dataset(docs, tok, a.seq_len, max_tokens=steps * a.batch_size * a.seq_len + a.seq_len)
    common = dict(stage1_steps=a.stage1_steps, stage2_steps=a.stage2_steps, batch_size=a.batch_size,
                  seq_len=a.seq_len, precision=a.precision, device=a.device, progress=False, tau_min=a.tau_min)
    meta = {"model": state_of(base).display_name, "training": {**common, "train_file": a.train_file,
            "tokens": steps * a.batch_size * a.seq_len, "optimiser": "trainer defaults (backbone lr 1e-4, router "
            "lr 1e-3 wd 1e-2, AdamW, constant)"},
            "eval": f"{a.eval_data} (first {a.eval_tokens} tokens, 512-token non-overlapping windows)",
            "knob_calibration": f"{a.calib_file}, {a.calib_tokens} tokens",
            "command": "python -m prunepath.pipeline.compare_trained " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": (torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu")
            + f", torch {torch.__version__}"}
    res = Results(Path(a.out), meta)

    def evaluate(key, method, m, extra):
        t = time.time()
        r = perplexity.evaluate_perplexity(m, tok, a.eval_data, window=512, max_tokens=a.eval_tokens, progress=False,
                                batch_size=32)
        res.add({"key": key, "method": method, "s_ffn": r["s_ffn"], "ppl": r["ppl"], "nll": r["nll"],
                 "tokens": r["tokens"], "per_layer_s_ffn": r.get("per_layer_s_ffn"),
                 "eval_s": round(time.time() - t, 1), **extra})

    runs = []
    if "dense" in a.methods:
        runs.append(("dense", {}, "dense-ft"))
    if "prunepath" in a.methods:
        runs.append(("prunepath", {}, "prunepath"))
    if "lte" in a.methods:
        runs += [("lte", {"eta": float(e)}, f"lte(eta={float(e)})") for e in a.lte_etas.split(",")]
    for method, params, name in runs:
        if res.done(f"{name}@trained"):
            continue
        model = copy.deepcopy(base)
        if method != "dense":
            prunepath.moefy(model, neurons_per_expert=32, progress=False)
        cfg = TrainConfig(method=method, method_params=dict(params), **common)
        if method == "lte":
            prepare_for_training(model, cfg)  # LTE router + soft routing before the optimiser exists
        tr = time.time()
        result = train(model, tok, data, cfg)
        info = {"train_s": round(time.time() - tr, 1), "train_tokens": result.tokens,
                "train_loss_last10": result.train_loss, "train_s_ffn_last10": result.s_ffn, **params}
        if hasattr(model, "_original_forward"):  # accelerate's autocast wrapper: evaluate in fp32 like the rest
            model.forward = model._original_forward
        model.eval()
        if method == "dense":
            evaluate(f"{name}@trained", "dense-ft", model, info)
            continue
        inputs = [x.to(a.device) for x in collect_ffn_inputs(
            model, token_batches(tok, calib, max_tokens=a.calib_tokens), progress=False)]
        if method == "prunepath":
            prunepath.configure(model, tau=TAU_ALL)
            evaluate(f"{name}@trained", name, model, {**info, "knob": {"tau": TAU_ALL}})
            for t in targets:
                tau, s_cal = knob_for_sparsity(model, inputs, "prunepath", t)
                prunepath.configure(model, tau=tau)
                evaluate(f"{name}@{t}", name, model, {**info, "knob": {"tau": tau}, "s_ffn_calibration": s_cal})
        else:
            prunepath.configure(model, method="lte", params={"soft": False, "threshold": 0.5})
            evaluate(f"{name}@trained", name, model, {**info, "knob": {"threshold": 0.5}})
            for t in targets:
                delta, s_cal = knob_for_sparsity(model, inputs, "lte", t)
                if abs(s_cal - t) > 0.05:
                    continue
                prunepath.configure(model, method="lte", params={"soft": False, "threshold": delta})
                evaluate(f"{name}@{t}", name, model, {**info, "knob": {"threshold": delta}, "s_ffn_calibration": s_cal})
        del model, inputs
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
    res.data["meta"]["wall_s"] = round(time.time() - t0, 1)
    res.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
