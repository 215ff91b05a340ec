"""Where does the global budget put the MACs, by structure optimizer? (synthetic)

A 4-layer residual student-teacher MLP of 64 x 64 GBLR layers, two "hard" (teacher spectrum
(i + 1)^-1/2 over all 64 directions) and two "easy" (teacher of rank 2 plus a faint tail) starts
from the teachers' SVD with --rank-ratio of the components at full width (0.25: the paper's GPT-2
setting; 16 components, then projected onto --budget) or, with --rank-ratio -1, at the low-rank
start of --budget (6 full components per layer, within budget) and is fine-tuned under the budget. Each
variant (structure optimizer x budget mode) runs on the same --seeds; the table gives the MACs per
layer kind and the test loss (MSE / mean square of the teacher's output), mean +- 95% CI over
seeds, and the loss difference to the paper's setting (adam, global) paired by seed.

    OMP_NUM_THREADS=1 python scripts/bench_allocation.py --seeds 5 --out allocation.json
    OMP_NUM_THREADS=1 python scripts/bench_allocation.py --seeds 5 --rank-ratio -1 --out allocation_lowrank.json
"""
import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from synthetic import macs_by_kind, run

# name: (structure optimizer, budget mode, extra options of synthetic.run)
VARIANTS = {
    "adam/global": ("adam", "global", {}),  # the paper's
    "shared_adam/global": ("shared_adam", "global", {}),  # betas (0.9, 0.999) on the widths
    "shared_adam(b1=0)/global": ("shared_adam", "global", {"width_betas": (0.0, 0.999)}),
    "layer_adam/global": ("shared_adam", "global", {"per_layer": True}),  # one normalizer per layer
    "adam/uniform": ("adam", "uniform", {}),
    "shared_adam/uniform": ("shared_adam", "uniform", {}),
}
T95 = {1: 12.71, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 14: 2.145, 19: 2.093, 29: 2.045}


def mean_ci(values) -> tuple[float, float]:
    """Mean and half-width of the 95% t interval."""
    n = len(values)
    if n < 2:
        return float(values[0]), float("nan")
    t = T95.get(n - 1) or min((v for k, v in T95.items() if k <= n - 1), default=1.96)
    return statistics.fmean(values), t * statistics.stdev(values) / math.sqrt(n)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--structure-lr", type=float, default=1e-2)
    parser.add_argument("--rank-ratio", type=float, default=0.25,
                        help="fraction of components at full width in the start, then projected onto the budget "
                             "(the paper's GPT-2 setting: 0.25); a negative value: the low-rank start of the budget")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--reference", default="adam/global", help="paired loss differences are taken to this variant")
    parser.add_argument("--out", type=Path, default=Path("allocation.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    results = {}
    for name in args.variants:
        optimizer, mode, extra = VARIANTS[name]
        results[name] = []
        for seed in range(args.seeds):
            start = time.time()
            r = run(optimizer, mode, seed=seed, steps=args.steps, budget=args.budget,
                    structure_lr=args.structure_lr, rank_ratio=None if args.rank_ratio < 0 else args.rank_ratio,
                    **extra)
            r["seconds"] = time.time() - start
            results[name].append(r)
            print(f"{name} seed {seed}: loss {r['loss']:.4f} macs {r['macs']} ({r['seconds']:.1f}s)", flush=True)

    rows = []
    reference = results.get(args.reference)
    for name, runs in results.items():
        row = {"variant": name}
        for kind in ("hard", "easy"):
            row[f"macs_{kind}"] = mean_ci([macs_by_kind(r)[kind] for r in runs])
        row["loss"] = mean_ci([r["loss"] for r in runs])
        if reference is not None and name != args.reference:
            row["loss_minus_reference"] = mean_ci([r["loss"] - q["loss"] for r, q in zip(runs, reference)])
            row["relative_loss_change"] = mean_ci([r["loss"] / q["loss"] - 1 for r, q in zip(runs, reference)])
        rows.append(row)

    first = next(iter(results.values()))
    print(f"\n{args.seeds} seeds, {args.steps} steps, budget {args.budget} ({first[0]['max_macs']:.0f} MACs), "
          f"structure lr {args.structure_lr}, rank ratio {args.rank_ratio}; start loss {statistics.fmean(r['start_loss'] for r in first):.4f}; "
          f"mean +- 95% CI")
    header = f"{'variant':28s} {'MACs hard':>14s} {'MACs easy':>14s} {'loss':>18s} {'vs ' + args.reference:>24s}"
    print(header + "\n" + "-" * len(header))
    for row in rows:
        diff = row.get("relative_loss_change")
        print(f"{row['variant']:28s} {row['macs_hard'][0]:7.0f} ±{row['macs_hard'][1]:5.0f} "
              f"{row['macs_easy'][0]:7.0f} ±{row['macs_easy'][1]:5.0f} {row['loss'][0]:10.4f} ±{row['loss'][1]:.4f} "
              + (f"{100 * diff[0]:+14.2f}% ±{100 * diff[1]:.2f}%" if diff else f"{'-':>24s}"))
    args.out.write_text(json.dumps({"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                    "rows": rows, "runs": results}, indent=1))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
