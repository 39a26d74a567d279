"""Side-by-side run of PrunePath and the baselines on one model, with the backbone frozen (router fitting
only), on the same calibration tokens, evaluated by the same perplexity code. Results are appended row by row to
a JSON file (written to a temp name, then renamed), so an interrupted run resumes where it stopped.

    prunepath compare --out docs/results/baselines-smollm2-135m.json      # the CLI: prunepath.cli.compare

What this is *not*: the paper's protocol (joint training of router + backbone for PrunePath and LTE). LTE here is
the layer-local proxy of :mod:`prunepath.baselines.fitting`; PrunePath is the router warm start (KL to each
expert's output-norm share) with unit gates. See docs/baselines.md.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from prunepath.state import state_of
import prunepath
from prunepath.baselines import fitting
from prunepath.calibration import calibration_texts  # noqa: F401  (re-exported)
from prunepath.baselines.calibration import (collect_ffn_inputs, data_root,
                                             expert_mass, token_batches)
from prunepath.baselines.knobs import knob_for_sparsity
from prunepath.baselines.static import prune_experts
from prunepath.baselines.wanda import apply_wanda, input_norms, target_linears
from prunepath.evaluation import perplexity


class Results:
    def __init__(self, path: Path, meta: dict) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"meta": meta, "rows": []}
        self.data["meta"].update({k: v for k, v in meta.items() if k not in self.data["meta"]})

    def done(self, key: str) -> bool:
        return any(r["key"] == key for r in self.data["rows"])

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.save()
        print(f"{row['key']:40s} s_ffn={row['s_ffn']:.3f} ppl={row['ppl']:.2f}", flush=True)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)


DEFAULT_OUT = "docs/results/baselines-smollm2-135m.json"
DEFAULT_METHODS = ("dense", "prunepath", "lte", "moefication", "d2dmoe", "static", "wanda")


def default_eval_data() -> str:
    """The default evaluation text: WikiText-2 validation under the shared data folder."""
    return str(data_root() / "wikitext-2" / "wiki.valid.raw")


def compare_baselines(*, model: str = "smollm2-135m", out: str | Path = DEFAULT_OUT, eval_data: str | None = None,
                      eval_tokens: int = 16384, calib: str = "mix:sotu,moby-dick,brown",
                      calib_file: str | None = None, display_name: str | None = None, device: str = "cpu",
                      calib_tokens: int = 16384, seq_len: int = 256, steps: int = 200, batch: int = 256,
                      lr: float = 3e-3, targets: Sequence[float] = (0.3, 0.5, 0.7, 0.9),
                      lte_etas: Sequence[float] = (0.05, 0.2, 1.0), lte_delta_sweep: Sequence[float] = (0.2,),
                      methods: Sequence[str] = DEFAULT_METHODS, neurons_per_expert: int = 32,
                      command: str | None = None) -> Path:
    """Run PrunePath and the baselines side by side on ``model`` with the backbone frozen (router fitting only),
    appending one row per (method, target s_FFN) to the JSON file ``out`` (resumable: rows already there are
    skipped). ``eval_data`` defaults to :func:`default_eval_data`; ``calib_file`` (a JSON list of texts) replaces
    the ``calib`` corpus mix; ``lte_delta_sweep`` lists the LTE η whose δ is also swept to the ``targets``;
    ``command`` is recorded in the file's meta. Returns the path of the results file."""
    eval_data = default_eval_data() if eval_data is None else eval_data
    if command is None:
        command = f"prunepath.pipeline.compare.compare_baselines(model={model!r}, out={str(out)!r}, ...)"
    targets = [float(t) for t in targets]
    methods = list(methods)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    t0 = time.time()
    model, tok = prunepath.load_model(model, device=device)
    model.eval()
    if display_name:
        state_of(model).display_name = display_name
    if calib_file:
        texts, calib_desc = json.loads(Path(calib_file).read_text()), f"{calib_file}"
    else:
        texts, calib_desc = calibration_texts(calib)
    meta = {"model": state_of(model).display_name, "eval": f"{eval_data} (first {eval_tokens} tokens, "
            "512-token non-overlapping windows)", "calibration": f"{calib_desc}, {calib_tokens} tokens",
            "fitting": f"backbone frozen; {steps} Adam steps x {batch} tokens per layer, lr {lr}",
            "command": command,
            "machine": (torch.cuda.get_device_name() if device.startswith("cuda") else
                        f"{platform.machine()} {os.cpu_count()} cores (shared)") + f", torch {torch.__version__}, fp32"}
    res = Results(Path(out), meta)

    def evaluate(key: str, method: str, m, extra: dict, s_override: float | None = None) -> None:
        t = time.time()
        r = perplexity.evaluate_perplexity(m, tok, eval_data, window=512, max_tokens=eval_tokens, progress=False,
                                batch_size=4 if device == "cpu" else 32)
        s = r["s_ffn"] if s_override is None else s_override
        res.add({"key": key, "method": method, "s_ffn": s, "ppl": r["ppl"], "nll": r["nll"], "tokens": r["tokens"],
                 "per_layer_s_ffn": r.get("per_layer_s_ffn"), "eval_s": round(time.time() - t, 1), **extra})

    if "dense" in methods and not res.done("dense"):
        evaluate("dense", "dense", model, {})
    batches = token_batches(tok, texts, seq_len=seq_len, max_tokens=calib_tokens)

    # ---- Wanda on the dense model (weights restored between levels) --------------------------------------------
    if "wanda" in methods and not all(res.done(f"wanda@{t}") for t in targets):
        mods = target_linears(model, "ffn")
        saved = {n: m.weight.detach().clone() for n, m in mods.items()}
        norms = input_norms(model, mods, batches)
        for t in targets:
            if res.done(f"wanda@{t}"):
                continue
            info = apply_wanda(model, tok, texts, t, norms=norms)
            evaluate(f"wanda@{t}", "wanda", model, {"knob": {"weight_sparsity": t},
                     "note": "s_ffn = FFN weight sparsity (unstructured; no speed-up)"}, s_override=info["sparsity"])
            with torch.no_grad():
                for n, m in mods.items():
                    m.weight.copy_(saved[n])
        del saved

    # ---- converted model, cached FFN inputs shared by every router method -------------------------------------
    prunepath.moefy(model, neurons_per_expert=neurons_per_expert, progress=True)
    inputs = [x.to(device) for x in collect_ffn_inputs(model, batches)]
    res.data["meta"]["experts"] = f"{state_of(model).config.num_experts} x {neurons_per_expert} per layer (kmeans)"
    res.data["meta"]["calibration_tokens_used"] = int(inputs[0].shape[0])
    res.save()
    ffns = prunepath.prunepath_modules(model)

    if "static" in methods:
        with torch.no_grad():
            mass = [expert_mass(f, x).sum(0).double() for f, x in zip(ffns, inputs)]
        for t in targets:
            if not res.done(f"static@{t}"):
                prune_experts(model, tok, texts, t, mass=mass, progress=False)
                evaluate(f"static@{t}", "static", model, {"knob": {"sparsity": t}})

    fit = dict(steps=steps, batch_size=batch, lr=lr, inputs=inputs)
    for method in ("prunepath", "moefication", "d2dmoe"):
        if method not in methods or all(res.done(f"{method}@{t}") for t in targets):
            continue
        info = fitting.fit_router(model, method=method, **fit)
        base = {"gates": False} if method == "prunepath" else {}
        for t in targets:
            if res.done(f"{method}@{t}"):
                continue
            knob, s_cal = knob_for_sparsity(model, inputs, method, t, base=base)
            setting = {"k": int(knob)} if method == "moefication" else {"tau": knob}
            prunepath.configure(model, method=method, **setting, **base)
            evaluate(f"{method}@{t}", method, model, {"knob": setting, "s_ffn_calibration": s_cal,
                     "fit_final_loss_mean": sum(info["final_loss"]) / len(info["final_loss"])})

    if "lte" in methods:
        for eta in [float(e) for e in lte_etas]:
            sweep = eta in [float(e) for e in lte_delta_sweep]
            keys = [f"lte(eta={eta})@delta=0.5"] + ([f"lte(eta={eta})@{t}" for t in targets] if sweep else [])
            if all(res.done(k) for k in keys):
                continue
            info = fitting.fit_router(model, method="lte", params={"eta": eta}, **fit)
            extra = {"eta": eta, "fit_final_loss_mean": sum(info["final_loss"]) / len(info["final_loss"]),
                     "note": "layer-local LTE proxy (reconstruction loss instead of task loss), backbone frozen"}
            if not res.done(keys[0]):
                prunepath.configure(model, method="lte", params={"soft": False, "threshold": 0.5})
                evaluate(keys[0], "lte", model, {**extra, "knob": {"threshold": 0.5}})
            for key, t in zip(keys[1:], targets if sweep else []):
                if res.done(key):
                    continue
                delta, s_cal = knob_for_sparsity(model, inputs, "lte", t)
                if abs(s_cal - t) > 0.05:  # this η cannot reach t with any δ on calibration data
                    continue
                prunepath.configure(model, method="lte", params={"soft": False, "threshold": delta})
                evaluate(key, "lte", model, {**extra, "knob": {"threshold": delta}, "s_ffn_calibration": s_cal})
    res.data["meta"]["wall_s"] = round(time.time() - t0, 1)
    res.save()
    return res.path


if __name__ == "__main__":  # the command line moved to `prunepath compare` (prunepath.cli.compare)
    sys.exit("python -m prunepath.pipeline.compare moved: run `prunepath compare` (same options)")
