"""How well each weight type fits structured 64x64 teachers at equal MACs.

    python scripts/bench_fit.py                 # budgets 0.25 and 0.5, all teachers (~3 min, one core)
    python scripts/bench_fit.py --quick         # budget 0.25, three structured teachers (~30 s)
    python scripts/bench_fit.py --variant edges_off='{"edges": false}' --methods fit   # ablations

Teachers (fixed seeds, 64x64, unit Frobenius norm):
    block_diag      4 diagonal blocks of unequal sizes 12, 20, 8, 24, rank 3 each
    off_diag        5 blocks at scattered positions (two wrap around the axis ends), rank 2 each
    blocks_lowrank  4 diagonal blocks (16x16, rank 2 each) plus a global rank-2 term at 0.3 x the scale
    banded          7 overlapping 16x16 tiles along the diagonal at stride 8, rank 2 each
    lowrank         plain rank 8
    gaussian        i.i.d. N(0, 1)
Every structured teacher is built as a sum of rank-1 components on cyclic row x column intervals,
i.e. it IS a GBLR matrix; its exact cost (sum of min(a + b, a b) over its rank-1 components) is
printed and always within budget 0.25 (1024 MACs). Low-rank and Monarch cannot represent the first
four exactly at that budget (their ranks exceed 8, the budget's low-rank rank).

Methods, each at <= budget * 64 * 64 MACs:
    svd          truncated SVD at the budget's rank (Eckart-Young optimal low-rank)
    monarch      closed-form Monarch projection at the budget's block count
    gblr_lowrank from_dense("gblr", init="lowrank"): the top SVD components at full width
    paper_fit    the paper's recipe through fit_gblr: full widths at random locations, no edges, no
                 sigma annealing, structure steps of 20 elements (20 / min(in, out) normalized),
                 no best-iterate or SVD fallback
    fit          gblr.fit.fit_gblr with its defaults (and each --variant: fit_gblr with those options)
Columns: relative Frobenius error ||W_hat - W||_F / ||W||_F and MACs used. Writes JSON (--out).
"""
import argparse
import json
import os
import time

import torch

from gblr.fit import fit_gblr
from gblr.layers import from_dense, relative_error

N = 64


def _component(rows, cols, rank, generator, scale=1.0):
    """A rank-``rank`` block on the cyclic row interval rows=(start, width) x cols=(start, width)."""
    (rs, rw), (cs, cw) = rows, cols
    block = torch.zeros(N, N, dtype=torch.float64)
    u = torch.randn(rw, rank, generator=generator, dtype=torch.float64)
    v = torch.randn(cw, rank, generator=generator, dtype=torch.float64)
    s = torch.linspace(1.0, 0.5, rank, dtype=torch.float64)  # distinct singular values within a block
    values = scale * (u * s) @ v.T / (rw * cw) ** 0.5
    r_idx = (rs + torch.arange(rw)) % N
    c_idx = (cs + torch.arange(cw)) % N
    block[r_idx[:, None], c_idx[None, :]] = values
    return block, rank * min(rw + cw, rw * cw)


def teacher(name: str) -> tuple[torch.Tensor, int | None]:
    """(W (64, 64) float32 of unit Frobenius norm, exact GBLR cost in MACs or None if not GBLR-exact)."""
    generator = torch.Generator().manual_seed(1234 + sum(map(ord, name)))
    parts = []
    if name == "block_diag":
        start = 0
        for size in (12, 20, 8, 24):
            parts.append(_component((start, size), (start, size), 3, generator))
            start += size
    elif name == "off_diag":
        for rows, cols in (((0, 16), (40, 16)), ((20, 12), (4, 20)), ((56, 16), (26, 10)),
                           ((34, 18), (58, 14)), ((10, 8), (28, 8))):
            parts.append(_component(rows, cols, 2, generator))
    elif name == "blocks_lowrank":
        for k in range(4):
            parts.append(_component((16 * k, 16), (16 * k, 16), 2, generator))
        parts.append(_component((0, N), (0, N), 2, generator, scale=0.3))
    elif name == "banded":
        for k in range(7):
            parts.append(_component((8 * k, 16), (8 * k, 16), 2, generator))
    elif name == "lowrank":
        parts.append(_component((0, N), (0, N), 8, generator))
    elif name == "gaussian":
        W = torch.randn(N, N, generator=generator, dtype=torch.float64)
        return (W / W.norm()).float(), None
    else:
        raise ValueError(f"unknown teacher {name!r}")
    W = sum(block for block, _ in parts)
    return (W / W.norm()).float(), sum(cost for _, cost in parts)


TEACHERS = ["block_diag", "off_diag", "blocks_lowrank", "banded", "lowrank", "gaussian"]
QUICK_TEACHERS = ["block_diag", "off_diag", "blocks_lowrank"]


def run_method(method: str, W: torch.Tensor, budget: float, options: dict):
    t0 = time.perf_counter()
    if method == "svd":
        layer = from_dense("lowrank", W, budget=budget)
    elif method == "monarch":
        layer = from_dense("monarch", W, budget=budget)
    elif method == "gblr_lowrank":
        layer = from_dense("gblr", W, budget=budget, init="lowrank")
    elif method == "paper_fit":
        layer = fit_gblr(W, None, budget, init="full", edges=False, anneal_sigma=None, structure_lr=20.0,
                         keep_best=False, svd_fallback=False)
    else:
        layer = fit_gblr(W, None, budget, **options)
    seconds = time.perf_counter() - t0
    macs = layer.macs_per_token()
    assert macs <= budget * W.numel(), (method, macs)
    return {"error": relative_error(layer.to_dense(), W), "macs": macs, "seconds": round(seconds, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budgets", default=None, help="comma-separated (default 0.25,0.5; --quick 0.25)")
    parser.add_argument("--teachers", default=None, help=f"comma-separated subset of {','.join(TEACHERS)}")
    parser.add_argument("--methods", default="svd,monarch,gblr_lowrank,paper_fit,fit")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=JSON options for fit_gblr; adds a method NAME (repeatable)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/bench_fit.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budgets = [float(b) for b in (args.budgets or ("0.25" if args.quick else "0.25,0.5")).split(",")]
    teachers = args.teachers.split(",") if args.teachers else (QUICK_TEACHERS if args.quick else TEACHERS)
    methods = {m: {} for m in args.methods.split(",") if m}
    for spec in args.variant:
        name, _, options = spec.partition("=")
        methods[name] = json.loads(options)
    rows = []
    names = list(methods)
    print(f"{'budget':>6} {'teacher':<15} {'exact':>5} " + " ".join(f"{m:>14}" for m in names) + "   (error / MACs)")
    for budget in budgets:
        for name in teachers:
            W, exact = teacher(name)
            row = {"budget": budget, "teacher": name, "exact_gblr_macs": exact, "max_macs": budget * W.numel()}
            for method in names:
                row[method] = run_method(method, W, budget, methods[method])
            rows.append(row)
            cells = " ".join(f"{row[m]['error']:7.3f}/{row[m]['macs']:<6d}" for m in names)
            print(f"{budget:6.2f} {name:<15} {exact if exact is not None else '-':>5} {cells}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"methods": methods, "rows": rows}, f, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
