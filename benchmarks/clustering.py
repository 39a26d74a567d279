"""Balanced k-means speed and quality at real FFN shapes (CPU).

    python benchmarks/clustering.py            # all shapes, writes benchmarks/results/clustering.json

Quality is reported as inertia relative to a random equal-size split (lower is better) and, for small layers,
relative to unconstrained k-means (scikit-learn), which is a lower bound that ignores the equal-size constraint.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

from prunepath.conversion.clustering import balanced_kmeans, inertia  # noqa: E402

SHAPES = {  # name: (d_ff, d_model, neurons per expert)
    "smollm2-135m": (1536, 576, 32),
    "qwen2.5-0.5b": (4864, 896, 32),
    "llama3-8b": (14336, 4096, 32),
    "qwen2-7b": (18944, 3584, 32),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    rows = []
    for name in args.shapes.split(","):
        d_ff, d, n = SHAPES[name]
        k = d_ff // n
        # Random rows with mild cluster structure: the cost does not depend on values, quality does a little.
        g = torch.Generator().manual_seed(0)
        centers = torch.randn(k, d, generator=g)
        x = centers[torch.randint(0, k, (d_ff,), generator=g)] + 2.0 * torch.randn(d_ff, d, generator=g)
        times = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            labels = balanced_kmeans(x, k, seed=r)
            times.append(time.perf_counter() - t0)
        sizes = torch.bincount(labels, minlength=k)
        rand = torch.randperm(d_ff, generator=g) % k
        row = dict(shape=name, d_ff=d_ff, d_model=d, experts=k, neurons_per_expert=n,
                   median_s=statistics.median(times), min_s=min(times),
                   equal_sizes=bool((sizes == n).all()),
                   inertia_vs_random=inertia(x, labels) / inertia(x, rand))
        if d_ff <= 5000:
            from sklearn.cluster import KMeans

            xn = torch.nn.functional.normalize(x, dim=1).numpy()
            t0 = time.perf_counter()
            km = KMeans(k, n_init=1, random_state=0).fit(xn)
            row["sklearn_unconstrained_s"] = time.perf_counter() - t0
            row["inertia_vs_unconstrained"] = inertia(x, labels) / float(km.inertia_)
        rows.append(row)
        print(f"{name:14s} {d_ff:6d}x{d:<5d} -> {k:4d} experts  median {row['median_s']:6.2f} s  "
              f"equal={row['equal_sizes']}  inertia/random={row['inertia_vs_random']:.3f}"
              + (f"  inertia/unconstrained={row['inertia_vs_unconstrained']:.3f}" if "inertia_vs_unconstrained" in row else ""),
              flush=True)
    path = write_json("clustering.json", {"machine": machine(), "command": "python benchmarks/clustering.py",
                                          "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
