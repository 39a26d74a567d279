"""Where a study training step's time goes: the round-7 recipe with its parts switched off one at a time.

A randomly initialised model of SmolLM2-135M's shape (its config.json and tokenizer, seeded random weights; the
step time does not depend on the weights) is trained by ``prunepath train`` with the flags of the study variant
``r7-split-n16`` (16-neuron experts, τ sampled, in-expert thresholds with mid bias, self-distillation KL and
router distillation, bf16, 32 × 512 tokens a step), then without router distillation, without the in-expert
thresholds, without the teacher, and with none of them. ``--before`` adds the r7 run with the step's helpers as
they were before 2026-12-04 (router target through a [tokens, E, d] product, kthvalue batch thresholds, per-step
s_FFN by boolean indexing; kept here as the baseline), and
``--pair`` two r7 processes side by side on the one GPU (how the study ran its two seeds). A micro-benchmark
times the two router-target forms on one layer's shapes. Prints a table and writes
``benchmarks/results/train-step-*.json``.

    python benchmarks/train_step.py --config-dir DIR_WITH_config.json_AND_TOKENIZER --data mix:moby-dick,austen \
        --steps 30 --before --pair --out-name train-step-h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, second_half_rate, write_json  # noqa: E402
from multi_gpu_train import make_random_model  # noqa: E402

R7 = ["--neurons-per-expert", "16", "--tau-schedule", "sample", "--tau-min", "0.5", "--tau-all-prob", "0.25",
      "--gate-offset", "4.0", "--lr-scheduler", "cosine", "--warmup-steps", "5"]
INNER = ["--inner-sparsity-max", "0.6", "--inner-off-prob", "0.125", "--inner-mid-bias", "0.15"]
TEACHER = ["--distill", "1.0"]
ROUTER_DISTILL = ["--router-distill", "1.0"]
VARIANTS = {
    "r7 recipe (teacher + router distillation + in-expert)": R7 + INNER + TEACHER + ROUTER_DISTILL,
    "without router distillation": R7 + INNER + TEACHER,
    "without in-expert thresholds": R7 + TEACHER + ROUTER_DISTILL,
    "without the teacher": R7 + INNER + ROUTER_DISTILL,
    "none of the three": R7,
}
OLD = "r7 recipe before (router target as a [tokens, E, d] product, kthvalue thresholds, indexed s_FFN)"


def old_norms(self, h, chunk: int = 1024):
    """The router-distillation target before the Gram form: ‖h_e W_down,e‖ through a [tokens, E, d] product."""
    import torch

    e, n = self.num_experts, self.neurons_per_expert
    w = self.down_proj.weight.float().view(-1, e, n)
    flat = h.reshape(-1, e, n)
    return torch.cat([torch.einsum("ten,den->ted", part.float(), w).norm(dim=-1) for part in flat.split(chunk)])


def old_quantile(v, fraction: float, samples: int = 1 << 18):
    """The batch threshold before: kthvalue on |v| (on CUDA a one-block selection)."""
    import torch

    a = v.detach().abs().reshape(-1)
    if a.numel() > samples:
        a = a[torch.randint(a.numel(), (samples,), device=a.device)]
    k = max(1, min(a.numel(), int(round(fraction * a.numel()))))
    return a.float().kthvalue(k).values.to(v.dtype)


def old_s_ffn(model, token_mask=None):
    """The trainer's per-step s_FFN before: per-token records gathered by boolean indexing (a host sync each)."""
    import torch

    from prunepath.state import state_of
    from prunepath.stats import active_counts, inner_s_per_token

    inner = inner_s_per_token(model, token_mask, keep_device=True)
    if inner is not None:
        return torch.stack([s.mean() for s in inner]).mean()
    counts = active_counts(model, token_mask, keep_device=True)
    return 1.0 - torch.stack([c.mean() for c in counts]).mean() / state_of(model).config.num_experts


def child(argv: list[str]) -> int:
    """``prunepath train`` with the earlier forms of the step's helpers patched in (the baseline)."""
    import prunepath.routing.ffn as ffn_mod
    import prunepath.training.trainer as trainer_mod
    from prunepath.cli.main import main as cli_main

    ffn_mod.PrunePathFFN._norms_of_intermediate = old_norms
    ffn_mod.batch_quantile = old_quantile
    trainer_mod.s_ffn_tensor = old_s_ffn
    return cli_main(argv) or 0


def train_cmd(model: Path, data: str, steps: int, out: Path, flags: list[str], old: bool) -> list[str]:
    head = [sys.executable, __file__, "--child"] if old else [sys.executable, "-m", "prunepath.cli.main"]
    return [*head, "train", "--model", str(model), "--task", "lm", "--data", data, "--seq-len", "512",
            "--batch-size", "32", "--stage1-steps", "4", "--stage2-steps", str(steps), "--device", "cuda",
            "--precision", "bf16", "--seed", "0", "--warmstart-steps", "0", "--log-every", "1", "--save-every", "0",
            "--no-progress", "--out", str(out), *flags]


def summarise(label: str, cmd: list[str], out: Path, wall: float) -> dict:
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    tok, step, n = second_half_rate(log)
    return {"label": label, "command": " ".join(cmd), "wall_s": round(wall, 1), "median_step_s": round(step, 4),
            "tokens_per_s": round(tok), "steps_timed": n, "final_loss": log[-1]["loss"]}


def run_all(jobs: list[tuple[str, list[str], Path]]) -> list[dict]:
    """Run the commands at once (one job: alone) and summarise each."""
    t = time.time()
    procs = [(label, cmd, out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
             for label, cmd, out in jobs]
    res = []
    for label, cmd, out, p in procs:
        text = p.communicate()[0]
        if p.returncode != 0:
            print(text[-4000:])
            raise SystemExit(f"{label} failed ({p.returncode})")
        res.append(summarise(label, cmd, out, time.time() - t))
    return res


def micro(tokens: int = 16384, d: int = 576, e: int = 96, n: int = 16, reps: int = 20) -> dict:
    """One layer's router target, both forms, on the GPU: median ms and the largest relative difference."""
    import torch

    from prunepath.routing.ffn import PrunePathFFN, batch_quantile

    ffn = PrunePathFFN(d, e, n, gated=True, activation=torch.nn.SiLU(), device="cuda")
    h = torch.randn(tokens, e * n, device="cuda", dtype=torch.bfloat16)
    torch.set_grad_enabled(False)  # the target is built under no_grad in training too

    def median_ms(fn) -> float:  # 3 warm-up calls, then ``reps`` synchronised calls
        for _ in range(3):
            fn()
        ts = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append((time.perf_counter() - t) * 1e3)
        return round(statistics.median(ts), 3)

    runs = {"gram": lambda: PrunePathFFN._norms_of_intermediate(ffn, h), "old": lambda: old_norms(ffn, h),
            "quantile_sort": lambda: batch_quantile(h, 0.4), "quantile_kthvalue": lambda: old_quantile(h, 0.4)}
    out = {f"{name}_ms": median_ms(fn) for name, fn in runs.items()}
    a, b = PrunePathFFN._norms_of_intermediate(ffn, h), old_norms(ffn, h)
    out["max_rel_diff"] = float(((a - b).abs() / b.clamp_min(1e-6)).max())
    out["shape"] = {"tokens": tokens, "hidden": d, "experts": e, "neurons_per_expert": n}
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-dir", required=True, type=Path)
    ap.add_argument("--data", default="mix:moby-dick,austen")
    ap.add_argument("--steps", type=int, default=30, help="stage-2 steps per run (after 4 stage-1 steps)")
    ap.add_argument("--variants", default="all", help="comma-separated indices into the variant list, or all")
    ap.add_argument("--before", action="store_true", help="also the r7 run with the step's earlier helpers")
    ap.add_argument("--pair", action="store_true", help="also two r7 runs side by side on the one GPU")
    ap.add_argument("--work", type=Path, default=Path("/tmp/train-step"))
    ap.add_argument("--out-name", default="train-step.json")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (the step time of the study's training)")
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / "random-smollm2-shape"
    make_random_model(args.config_dir, model, seed=0)
    names = list(VARIANTS)
    chosen = names if args.variants == "all" else [names[int(i)] for i in args.variants.split(",")]
    summary = {"model": "random init, SmolLM2-135M shape (config of SmolLM2-135M-Instruct)",
               "batch_tokens": 32 * 512, "stage2_steps": args.steps, "date": time.strftime("%Y-%m-%d"),
               **machine(), "micro": micro()}
    print("router target, one layer:", json.dumps(summary["micro"]), flush=True)
    runs: list[dict] = []

    def job(label: str, flags: list[str], tag: str, old: bool = False):
        out = args.work / tag
        subprocess.run(["rm", "-rf", str(out)])
        return label, train_cmd(model, args.data, args.steps, out, flags, old), out

    def save() -> None:  # after every run: a run cut short by a time limit keeps what finished
        base = runs[0]["median_step_s"]
        for r in runs:
            r["step_ratio_to_r7"] = round(r["median_step_s"] / base, 3)
        path = write_json(args.out_name, {"summary": summary, "runs": runs})
        if os.environ.get("OUT"):
            (Path(os.environ["OUT"]) / args.out_name).write_text(path.read_text())

    # most telling first: the recipe, the old router target, the pair, then the parts switched off
    r7 = VARIANTS[names[0]]
    plan: list[list] = [[job(names[0], r7, "v0")]] if names[0] in chosen else []
    if args.before:
        plan.append([job(OLD, r7, "old", old=True)])
    if args.pair:
        plan.append([job("r7 recipe, two processes side by side (each)", r7, f"pair{i}") for i in range(2)])
    plan += [[job(label, VARIANTS[label], f"v{names.index(label)}")] for label in chosen if label != names[0]]
    for jobs in plan:
        got = run_all(jobs)
        runs += got
        if len(got) == 2:
            summary["pair_total_tokens_per_s"] = sum(r["tokens_per_s"] for r in got)
        for r in got:
            print(f"{r['label']}: {r['tokens_per_s']:,} tok/s, median step {r['median_step_s']} s", flush=True)
        save()
    print("\n| run | tokens/s | median step (s) | step vs r7 | final loss |\n|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['label']} | {r['tokens_per_s']:,} | {r['median_step_s']} | {r['step_ratio_to_r7']} | "
              f"{r['final_loss']:.4f} |")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
