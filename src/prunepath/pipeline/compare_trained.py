"""Trained side-by-side run: PrunePath (one checkpoint, τ swept at inference) vs LTE (one checkpoint per η, δ
swept at inference) vs dense fine-tuning, all through ``prunepath.training.trainer.train`` with the same
training tokens, steps, optimiser settings and precision; evaluated by the same perplexity code. Rows are
appended to a JSON file as they come (temp name, then renamed).

    prunepath compare-trained --model PATH.gguf --train-file train.json \\
        --calib-file calib.json --eval-data wiki.valid.raw --device cuda --out results.json
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Sequence
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


def compare_trained_baselines(*, train_file: str, calib_file: str, eval_data: str, out: str | Path,
                              model: str = "smollm2-135m", display_name: str | None = None, eval_tokens: int = 16384,
                              device: str = "cuda", precision: str = "bf16", stage1_steps: int = 300,
                              stage2_steps: int = 300, batch_size: int = 8, seq_len: int = 512, tau_min: float = 0.7,
                              lte_etas: Sequence[float] = (0.1, 0.5, 2.0),
                              targets: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                              methods: Sequence[str] = ("dense", "prunepath", "lte"), calib_tokens: int = 16384,
                              command: str | None = None) -> Path:
    """Train dense fine-tuning, PrunePath (one checkpoint, τ swept at inference) and LTE (one checkpoint per η,
    δ swept) with the same tokens, steps and settings, and append one row per evaluated point to the JSON file
    ``out`` (resumable: a method whose ``@trained`` row is there is skipped). ``train_file`` / ``calib_file``:
    JSON lists of texts (training documents; texts that set τ / δ for each target s_FFN); ``command`` is
    recorded in the file's meta. Returns the path of the results file."""
    if command is None:
        command = (f"prunepath.pipeline.compare_trained.compare_trained_baselines(model={model!r}, "
                   f"out={str(out)!r}, ...)")
    t0 = time.time()
    targets = [float(t) for t in targets]
    base, tok = prunepath.load_model(model)
    if display_name:
        state_of(base).display_name = display_name
    docs = json.loads(Path(train_file).read_text())
    calib = json.loads(Path(calib_file).read_text())
    steps = stage1_steps + stage2_steps
    data = build_lm_dataset(docs, tok, seq_len, max_tokens=steps * batch_size * seq_len + seq_len)
    common = dict(stage1_steps=stage1_steps, stage2_steps=stage2_steps, batch_size=batch_size,
                  seq_len=seq_len, precision=precision, device=device, progress=False, tau_min=tau_min)
    meta = {"model": state_of(base).display_name, "training": {**common, "train_file": train_file,
            "tokens": steps * batch_size * seq_len, "optimiser": "trainer defaults (backbone lr 1e-4, router "
            "lr 1e-3 wd 1e-2, AdamW, constant)"},
            "eval": f"{eval_data} (first {eval_tokens} tokens, 512-token non-overlapping windows)",
            "knob_calibration": f"{calib_file}, {calib_tokens} tokens",
            "command": command,
            "machine": (torch.cuda.get_device_name() if device.startswith("cuda") else "cpu")
            + f", torch {torch.__version__}"}
    res = Results(Path(out), meta)

    def evaluate(key, method, m, extra):
        t = time.time()
        r = perplexity.evaluate_perplexity(m, tok, eval_data, window=512, max_tokens=eval_tokens, progress=False,
                                batch_size=32)
        res.add({"key": key, "method": method, "s_ffn": r["s_ffn"], "ppl": r["ppl"], "nll": r["nll"],
                 "tokens": r["tokens"], "per_layer_s_ffn": r.get("per_layer_s_ffn"),
                 "eval_s": round(time.time() - t, 1), **extra})

    runs = []
    if "dense" in methods:
        runs.append(("dense", {}, "dense-ft"))
    if "prunepath" in methods:
        runs.append(("prunepath", {}, "prunepath"))
    if "lte" in methods:
        runs += [("lte", {"eta": float(e)}, f"lte(eta={float(e)})") for e in lte_etas]
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
        inputs = [x.to(device) for x in collect_ffn_inputs(
            model, token_batches(tok, calib, max_tokens=calib_tokens), progress=False)]
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
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    res.data["meta"]["wall_s"] = round(time.time() - t0, 1)
    res.save()
    return res.path


if __name__ == "__main__":  # the command line moved to `prunepath compare-trained` (prunepath.cli.compare_trained)
    sys.exit("python -m prunepath.pipeline.compare_trained moved: run `prunepath compare-trained` (same options)")
