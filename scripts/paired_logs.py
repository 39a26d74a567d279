"""Compare two training logs of runs that drew the same steps (same seed: same batches, τ and in-expert draws).

Two runs of one recipe that differ in one setting see identical batches and identical sampled τ / in-expert
fractions when their seed is the same, so a loss term compared step by step isolates the setting. Prints, per
window of steps, the mean of the term in each log, the median per-step ratio B / A, and the same restricted to
the steps that ran every expert (τ > 1). Exits with an error if the logs did not draw the same τ.

    python scripts/paired_logs.py docs/results/train-logs/r7-split-n16.jsonl \
        docs/results/train-logs/r8-split-n16-nogates.jsonl --key distill --windows 100,400,700,970
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def load(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines()) if r.get("stage") == 2}


def compare(a: dict[int, dict], b: dict[int, dict], key: str, windows: list[int]) -> list[dict]:
    common = sorted(set(a) & set(b))
    if not common:
        raise SystemExit("the logs share no stage-2 step")
    bad = [s for s in common if abs(a[s]["tau"] - b[s]["tau"]) > 1e-9]
    if bad:
        raise SystemExit(f"the logs drew different τ (first at step {bad[0]}): not a paired comparison")
    rows = []
    for lo, hi in zip(windows, windows[1:]):
        for subset, keep in (("all steps", lambda s: True), ("τ > 1", lambda s: a[s]["tau"] > 1)):
            steps = [s for s in common if lo <= s < hi and keep(s)]
            if not steps:
                continue
            rows.append({"steps": f"{lo}-{hi}", "subset": subset, "n": len(steps),
                         "a": statistics.fmean(a[s][key] for s in steps),
                         "b": statistics.fmean(b[s][key] for s in steps),
                         "median_ratio": statistics.median(b[s][key] / a[s][key] for s in steps)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="the reference run's train_log.jsonl")
    ap.add_argument("b", type=Path, help="the other run's train_log.jsonl")
    ap.add_argument("--key", default="distill", help="logged term to compare (default distill)")
    ap.add_argument("--windows", default="0,400,700,100000", help="step boundaries, comma-separated")
    args = ap.parse_args(argv)
    windows = [int(x) for x in args.windows.split(",")]
    if len(windows) < 2 or windows != sorted(windows):
        ap.error("--windows needs at least two increasing step numbers, e.g. 0,500,1000")
    rows = compare(load(args.a), load(args.b), args.key, windows)
    name_a, name_b = (p.parent.name if p.stem == "train_log" else p.stem for p in (args.a, args.b))  # run dirs
    print(f"| steps | subset | n | {args.key}: {name_a} | {args.key}: {name_b} | median ratio b/a |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {r['subset']} | {r['n']} | {r['a']:.4f} | {r['b']:.4f} | {r['median_ratio']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
