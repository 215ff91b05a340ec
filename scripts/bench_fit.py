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
    blast        from_dense("blast"): the truncated SVD, then the BLAST paper's preconditioned gradient
                 descent at the budget's blocks and rank (never worse than the SVD at its MACs)
    gblr_lowrank from_dense("gblr", init="lowrank"): the top SVD components at full width
    paper_fit    the paper's recipe through fit_gblr: full widths at random locations, no edges, no
                 sigma annealing, structure steps of 20 elements (20 / min(in, out) normalized),
                 no best-iterate or SVD fallback
    fit          gblr.layers.fit_gblr with its defaults (and each --variant: fit_gblr with those options)
Columns: relative Frobenius error ||W_hat - W||_F / ||W||_F and MACs used. Writes JSON (--out).

    python scripts/bench_fit.py --vit-b         # time GBLR's fit of all 60 ViT-B/16 target layers
    python scripts/bench_fit.py --vit-b --kind blast --blocks 1   # BLAST's, one block (5 layers)
    python scripts/bench_fit.py --real          # output error, plain vs activation-aware, real layers
    python scripts/bench_fit.py --blast-blocks  # BLAST's error at each block count (~4 min, one core)

--vit-b: the fit (``from_dense("gblr", init="fit")``, or with --kind blast ``from_dense("blast")``;
--fit-steps, --budgets' first) of q, k, v (768x768), fc1 (3072x768) and fc2 (768x3072) of every block
of a randomly initialized timm vit_base_patch16_224 (--blocks to time fewer): seconds per layer, its
relative error and the truncated SVD's at the budget.
--real: the dense starts of the embedded tasks (gpt2_tiny on the pydoc text, vit_tiny on digits; trained
and cached by ``python run.py``), their target layers' inputs on validation data: the Gram of the first
half of the sequences (images) calibrates, the relative output error is measured on the other half.
Per weight type and budget, plain (gram=None) vs aware (gram=calibration Gram).
--blast-blocks: BLAST's relative error at 1, 2, 4, 8, 16 blocks (the rank the budget's largest) over the
truncated SVD's at the budget, on --real's layers and on q of a random-init ViT-B/16 block
(--budgets, default 0.05,0.1,0.2,0.3,0.4,0.5), and the block count the budget's rule picks
(``blast_nblocks``): the measurement behind that rule.
"""
import argparse
import json
import os
import time

import torch

from gblr.layers import fit_gblr
from gblr.layers import blast_macs, blast_nblocks, from_dense, relative_error
from gblr.layers.whiten import output_error

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
    elif method == "blast":
        layer = from_dense("blast", W, budget=budget)
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


def vit_b_layers(blocks: int):
    """(name, (out, in) weight) of the 60 target layers of a randomly initialized ViT-B/16."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    for i, block in enumerate(model.blocks[:blocks]):
        for name, w in zip("qkv", block.attn.qkv.weight.detach().chunk(3)):
            yield f"blocks.{i}.attn.{name}", w.clone()
        yield f"blocks.{i}.mlp.fc1", block.mlp.fc1.weight.detach().clone()
        yield f"blocks.{i}.mlp.fc2", block.mlp.fc2.weight.detach().clone()


def bench_vit_b(args, budget: float, options: dict) -> dict:
    rows = []
    for name, W in vit_b_layers(args.blocks):
        t0, c0 = time.perf_counter(), time.thread_time()
        steps = {} if args.fit_steps is None else {"fit_steps" if args.kind == "gblr" else "steps": args.fit_steps}
        fit = {"init": "fit"} if args.kind == "gblr" else {}
        layer = from_dense(args.kind, W, budget=budget, **fit, **steps, **options)
        rows.append({"layer": name, "shape": list(W.shape), "seconds": round(time.perf_counter() - t0, 2),
                     "cpu_seconds": round(time.thread_time() - c0, 2),  # this thread's: steadier on shared cores
                     "error": layer.projection_error, "macs": layer.macs_per_token(),
                     "lowrank_error": from_dense("lowrank", W, budget=budget).projection_error})
        print(f"{name:<20} {str(tuple(W.shape)):<12} {rows[-1]['seconds']:7.2f} s ({rows[-1]['cpu_seconds']:.2f} s CPU)  "
              f"error {rows[-1]['error']:.4f} (low-rank {rows[-1]['lowrank_error']:.4f})", flush=True)
    for shape in sorted({tuple(r["shape"]) for r in rows}):
        same = [r for r in rows if tuple(r["shape"]) == shape]
        print(f"{str(shape):<12} {len(same):3d} layers  {sum(r['seconds'] for r in same) / len(same):7.2f} s per layer "
              f"({sum(r['cpu_seconds'] for r in same) / len(same):.2f} s CPU)")
    print(f"all {len(rows)} layers: {sum(r['seconds'] for r in rows):.1f} s ({sum(r['cpu_seconds'] for r in rows):.1f} s CPU)")
    return {"kind": args.kind, "budget": budget, "fit_steps": args.fit_steps, "threads": args.threads,
            "options": options, "rows": rows}


REAL_SOURCES = [("gpt2_tiny", "pydoc", ("attn.c_attn", "mlp.c_fc", "mlp.c_proj")),
                ("vit_tiny", "digits", ("attn.qkv", "mlp.fc1", "mlp.fc2"))]


def real_layers(model_name: str, data: str, suffixes) -> list:
    """(name, (out, in) weight, calibration Gram, held-out Gram) of a cached dense start's target
    layers (timm's fused qkv split into q, k, v, which share their input)."""
    from gblr.system.config import compose
    from gblr.run.runner import dense_start
    from gblr.system.signals import StopRequest
    from gblr.tasks import build_task

    cfg = compose(f"model={model_name}", f"data={data}")
    task = build_task(cfg, torch.device("cpu"))
    task.load_data()
    model, _ = task.build_model(allow_random_fallback=False)
    with StopRequest() as stop:  # trained and cached when missing, as ``python run.py`` would
        dense_start(cfg, task, model, torch.device("cpu"), stop)
    model.eval()
    if hasattr(task, "val_tokens"):
        block = cfg.data.block_size
        stream = torch.as_tensor(task.val_tokens[: len(task.val_tokens) // block * block].astype("int64"))
        tokens = stream.view(-1, block)
        inputs = [tokens[: len(tokens) // 2], tokens[len(tokens) // 2:]]
    else:
        images = torch.stack([task.val_set[i][0] for i in range(len(task.val_set))])
        inputs = [images[: len(images) // 2], images[len(images) // 2:]]
    modules = {name: m for name, m in model.named_modules() if name.endswith(suffixes)}
    grams = [{name: 0 for name in modules} for _ in inputs]
    for half, batch in zip(grams, inputs):
        def hook(module, args, _output, name=None):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            half[name] = half[name] + x.T @ x
        handles = [m.register_forward_hook(lambda mod, a, o, n=name: hook(mod, a, o, n)) for name, m in modules.items()]
        with torch.no_grad():
            model(batch)
        for h in handles:
            h.remove()
    layers = []
    for name, m in modules.items():
        W = m.weight.detach().float()
        W = W if isinstance(m, torch.nn.Linear) else W.T  # HF Conv1D keeps (in, out)
        parts = zip("qkv", W.chunk(3)) if name.endswith("qkv") else [("", W)]
        for part, w in parts:
            layers.append((f"{model_name}.{name}{'.' + part if part else ''}", w.contiguous(), grams[0][name],
                           grams[1][name]))
    return layers


REAL_METHODS = {"lowrank": ("lowrank", {}), "monarch": ("monarch", {}), "blast": ("blast", {}), "gblr_lowrank": ("gblr", {}),
                "gblr_fit": ("gblr", {"init": "fit"})}


def bench_real(args, budgets) -> dict:
    rows = []
    for model_name, data, suffixes in REAL_SOURCES:
        for name, W, calibration, held_out in real_layers(model_name, data, suffixes):
            for budget in budgets:
                row = {"layer": name, "shape": list(W.shape), "budget": budget}
                for method, (kind, options) in REAL_METHODS.items():
                    if "init" in options and args.fit_steps is not None:
                        options = {**options, "fit_steps": args.fit_steps}
                    for mode, gram in (("plain", None), ("aware", calibration)):
                        layer = from_dense(kind, W, budget=budget, gram=gram, **options)
                        assert layer.macs_per_token() <= budget * W.numel()
                        row[f"{method}_{mode}"] = output_error(layer.to_dense(), W, held_out)
                rows.append(row)
                print(f"{name:<28} {budget:4.2f} " + " ".join(
                    f"{m}={row[m + '_plain']:.3f}/{row[m + '_aware']:.3f}" for m in REAL_METHODS), flush=True)
    print("\nmean held-out relative output error, plain -> aware (aware / plain), over the real layers")
    print(f"{'budget':>6} " + " ".join(f"{m:>24}" for m in REAL_METHODS))
    for budget in budgets:
        sel = [r for r in rows if r["budget"] == budget]
        cells = []
        for m in REAL_METHODS:
            plain = sum(r[m + "_plain"] for r in sel) / len(sel)
            aware = sum(r[m + "_aware"] for r in sel) / len(sel)
            cells.append(f"{plain:.3f} -> {aware:.3f} ({aware / plain:.2f})")
        print(f"{budget:6.2f} " + " ".join(f"{c:>24}" for c in cells))
    return {"fit_steps": args.fit_steps, "rows": rows}


BLAST_BLOCKS = (1, 2, 4, 8, 16)


def bench_blast_blocks(budgets) -> dict:
    """{"rows": per layer and budget, BLAST's error over the SVD's at each block count}; prints the
    mean per shape (out x in) of the real layers, and the ViT-B layer's own."""
    layers = [(name, W) for source in REAL_SOURCES for name, W, _, _ in real_layers(*source)]
    layers += [(name, W) for name, W in vit_b_layers(1) if name.endswith(".q")]
    rows = []
    for name, W in layers:
        group = name if name.startswith("blocks.0.") else "x".join(map(str, W.shape))
        for budget in budgets:
            svd = from_dense("lowrank", W, budget=budget).projection_error
            row = {"layer": name, "group": group, "shape": list(W.shape), "budget": budget,
                   "rule": blast_nblocks(W.shape[1], W.shape[0], budget)}
            for b in BLAST_BLOCKS:
                if blast_macs(W.shape[1], W.shape[0], b, 1) <= budget * W.numel():
                    row[b] = from_dense("blast", W, budget=budget, nblocks=b).projection_error / svd
            rows.append(row)
        print(f"{name:<28} done", flush=True)
    print("\nmean BLAST error / truncated SVD error at the budget, per block count (* the rule's)")
    for group in dict.fromkeys(r["group"] for r in rows):
        for budget in budgets:
            sel = [r for r in rows if r["group"] == group and r["budget"] == budget]
            rule = sel[0]["rule"]  # one shape per group: one rule
            cells = [f"{b}{'*' if b == rule else ''}={sum(r[b] for r in sel) / len(sel):.3f}"
                     for b in BLAST_BLOCKS if all(b in r for r in sel)]
            print(f"{group:<22} {budget:4.2f} {len(sel):3d} layers  " + "  ".join(cells))
    return {"blocks": BLAST_BLOCKS, "rows": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budgets", default=None, help="comma-separated (default 0.25,0.5; --quick 0.25)")
    parser.add_argument("--teachers", default=None, help=f"comma-separated subset of {','.join(TEACHERS)}")
    parser.add_argument("--methods", default="svd,monarch,blast,gblr_lowrank,paper_fit,fit")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=JSON options for fit_gblr; adds a method NAME (repeatable)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON path (default results/bench_fit[_vit_b|_real].json)")
    parser.add_argument("--vit-b", action="store_true", help="time the fit of every ViT-B/16 target layer")
    parser.add_argument("--real", action="store_true", help="plain vs activation-aware output error, real layers")
    parser.add_argument("--blast-blocks", action="store_true", help="BLAST's error at each block count")
    parser.add_argument("--blocks", type=int, default=12, help="--vit-b: the first N of ViT-B's 12 blocks")
    parser.add_argument("--kind", choices=("gblr", "blast"), default="gblr", help="--vit-b: whose fit to time")
    parser.add_argument("--fit-steps", type=int, default=None, help="--vit-b, --real: the fit's steps (default: its own)")
    parser.add_argument("--fit-options", default="{}", help="--vit-b: JSON options for from_dense, e.g. "
                        '\'{"patience": null}\'')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.blast_blocks:
        budgets = [float(b) for b in (args.budgets or "0.05,0.1,0.2,0.3,0.4,0.5").split(",")]
        write_json(args.out or "results/bench_fit_blast_blocks.json", bench_blast_blocks(budgets))
        return
    if args.vit_b or args.real:
        if args.vit_b:
            budget = float((args.budgets or "0.25").split(",")[0])
            result = bench_vit_b(args, budget, json.loads(args.fit_options))
        else:
            result = bench_real(args, [float(b) for b in (args.budgets or "0.1,0.25,0.5").split(",")])
        write_json(args.out or f"results/bench_fit_{'vit_b' if args.vit_b else 'real'}.json", result)
        return
    args.out = args.out or "results/bench_fit.json"
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
    write_json(args.out, {"methods": methods, "rows": rows})


def write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
