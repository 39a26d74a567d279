"""One GPU vs two GPUs (``accelerate launch``, DDP) running the same ``prunepath train`` command.

A randomly initialised model of SmolLM2-135M's shape (config.json + tokenizer of the real model, random weights,
seeded) is trained with the same global batch: 1 process × batch 2b against 2 processes × batch b. The step's
rows are the same in both (``BatchStream``), so the per-step loss curves should agree up to bf16 / reduction-order
noise, and throughput is the question. Prints a table and writes ``benchmarks/results/multi-gpu-train-*.json``.

    python benchmarks/multi_gpu_train.py --config-dir DIR_WITH_config.json_AND_TOKENIZER --data mix:moby-dick,austen \
        --batch 16 --seq-len 512 --steps 40 --out-name multi-gpu-train-h200x2.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, second_half_rate, write_json  # noqa: E402


def make_random_model(config_dir: Path, dest: Path, seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (dest / "config.json").exists():
        return
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(dest)


def run(label: str, launcher: list[str], model: Path, data: str, batch: int, seq: int, steps: int,
        out: Path, extra: list[str], gpus: str) -> dict:
    cmd = [*launcher, "-m", "prunepath.cli.main", "train", "--model", str(model), "--task", "lm", "--data", data,
           "--seq-len", str(seq), "--batch-size", str(batch), "--stage1-steps", str(steps // 2),
           "--stage2-steps", str(steps - steps // 2), "--tau-min", "0.7", "--device", "cuda",
           "--precision", "bf16", "--seed", "0", "--no-progress", "--out", str(out), *extra]
    print(f"[{label}] {' '.join(cmd)}", flush=True)
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": gpus})
    wall = time.time() - t
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n")
        raise SystemExit(f"{label} failed")
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    tok_s, step_s, _ = second_half_rate(log)
    return {"label": label, "command": " ".join(cmd), "wall_s": round(wall, 1), "tokens_per_s": round(tok_s),
            "median_step_s": round(step_s, 4), "final_loss": log[-1]["loss"],
            "final_s_ffn": log[-1].get("s_ffn"), "losses": [r["loss"] for r in log],
            "tokens": log[-1]["tokens"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-dir", required=True, type=Path)
    ap.add_argument("--data", default="mix:moby-dick,austen")
    ap.add_argument("--batch", type=int, default=16, help="per-GPU batch of the 2-GPU run (1 GPU gets 2x)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--work", type=Path, default=Path("/tmp/multi-gpu-train"))
    ap.add_argument("--out-name", default="multi-gpu-train.json")
    ap.add_argument("--one-gpu-only", action="store_true",
                    help="run only the 1-GPU half (when a single GPU is lent): its throughput and loss curve")
    ap.add_argument("--wait-file", type=Path, help="before the 2-GPU run, wait (<= 6 min) until this file exists "
                    "(another job holds GPU 1 until then)")
    args = ap.parse_args()

    import torch

    if torch.cuda.device_count() < (1 if args.one_gpu_only else 2):
        raise SystemExit(f"needs {1 if args.one_gpu_only else 2} GPU(s), found {torch.cuda.device_count()} "
                         "(the 2-GPU comparison needs device kind nvidia-h200-x2; --one-gpu-only runs the first half)")
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / "random-smollm2-shape"
    make_random_model(args.config_dir, model, seed=0)
    for d in ("one", "two"):
        subprocess.run(["rm", "-rf", str(args.work / d)])
    py = [sys.executable]
    one = run("1 GPU", [*py], model, args.data, 2 * args.batch, args.seq_len, args.steps, args.work / "one", [], "0")
    runs = [one]
    summary = {"model": "random init, SmolLM2-135M shape (config of SmolLM2-135M-Instruct)",
               "global_batch_tokens": 2 * args.batch * args.seq_len, "steps": args.steps,
               "date": time.strftime("%Y-%m-%d"), **machine(), "gpus": torch.cuda.device_count()}
    if args.one_gpu_only:
        summary["note"] = "1-GPU half only: no second GPU was lent"
    else:
        if args.wait_file is not None:
            t = time.time()
            while not args.wait_file.exists() and time.time() - t < 360:
                time.sleep(2)
            print(f"waited {time.time() - t:.0f} s for {args.wait_file}", flush=True)
        two = run("2 GPUs (accelerate launch, DDP)",
                  [*py, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--mixed_precision", "bf16"],
                  model, args.data, args.batch, args.seq_len, args.steps, args.work / "two", [], "0,1")
        runs.append(two)
        diffs = [abs(a - b) for a, b in zip(one["losses"], two["losses"])]
        half = len(diffs) // 2
        summary.update(max_abs_loss_diff_stage1=max(diffs[:half]), max_abs_loss_diff_stage2=max(diffs[half:]),
                       mean_abs_loss_diff=sum(diffs) / len(diffs),
                       speedup_2gpu=round(two["tokens_per_s"] / one["tokens_per_s"], 3))
    print("\n| run | tokens/s | median step (s) | final loss | wall (s) |\n|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['label']} | {r['tokens_per_s']:,} | {r['median_step_s']} | {r['final_loss']:.4f} | {r['wall_s']} |")
    print(json.dumps(summary, indent=1))
    path = write_json(args.out_name, {"summary": summary, "runs": runs})
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / args.out_name).write_text(path.read_text())
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
