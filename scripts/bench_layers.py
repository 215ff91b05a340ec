"""Wall-clock benchmark of the weight types at ViT-B / GPT-2 layer shapes.

    python scripts/bench_layers.py --quick                  # smoke run, under a minute on 2 CPU cores
    python scripts/bench_layers.py                          # full default run, ~10-15 min on 2 CPU cores
    python scripts/bench_layers.py --threads 1 --stat min   # steadier on cores shared with other work
    python scripts/bench_layers.py --shapes 768x3072 --tokens 4096 --budgets 0.25 --kinds lowrank,gblr

For every shape (written out x in), budget (target MACs / dense MACs) and token count it times, in one
process, a layer on a (tokens, in) input:
    dense                 the reference every ratio is taken against
    lowrank, monarch      from_dense at the budget
    blast                 from_dense(steps=0) at the budget: its structure (blocks, rank), unfitted (the fit
                          changes the factors' values, not their shapes or the forward's work)
    gblr-init             from_dense(init="lowrank"), the budget's top singular components at full width
                          (GBLR "as initialized")
    gblr-random           build("gblr", ...): every component at the same width, random locations
    gblr-scattered        build(...), then uniform random widths and locations projected to the budget
                          (project_widths): a layout of mixed widths (--scattered)
GBLR is timed in training form (the GBLRLinear: forward, forward+backward; with --reference also on
the plain autograd path that keeps the masked factors, "train-ref") and in inference form
(to_inference(mode="auto"), forward only; the mode auto picked and the MACs its GEMMs execute are
recorded; auto chooses on min(tokens, 4096) tokens). "fwd" runs under torch.no_grad; "fwd+bwd" is
one training step of the layer: forward, then backward into the input and every parameter.
Each time is the median (--stat min: the minimum) of --repeats runs after one warm-up; the calls of
one (shape, tokens) block take turns so that drifting load from other processes hits all alike.
Beyond 4096 tokens the repeats shrink in proportion (default 5: 5 at 197 and 4096 tokens, 1 at
25216). fp32 on CPU, bf16 autocast on CUDA. --threads 1 avoids thread oversubscription when the
cores are shared with other work.

--clock cpu times with the calling thread's CPU clock (time.thread_time) instead of the wall clock:
with --threads 1 all the work runs on that thread, and time other processes take from a shared core
is not counted (page faults and cache misses still are).

Prints the full table, then the summary table (rows shape@budget; columns low-rank, Monarch, BLAST,
GBLR random layout, GBLR as initialized; value = forward time relative to dense / MAC ratio, 1.0 = as
fast as the MACs promise), and the CPU targets at 4096 tokens (reported, never enforced): low-rank,
Monarch and BLAST <= 1.3, GBLR inference <= 1.5, GBLR training step <= 1.2x dense.
Writes JSON (default results/bench_layers_<device>.json) atomically.
"""
import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

from gblr.structure.budget import project_widths
from gblr.layers import build, from_dense, to_inference

FULL = dict(shapes="768x768,768x3072,3072x768", tokens="197,4096,25216", budgets="0.25,0.5", repeats=5)
QUICK = dict(shapes="768x768", tokens="197,1024", budgets="0.25", repeats=2)
TARGETS = {"lowrank": 1.3, "monarch": 1.3, "blast": 1.3, "infer": 1.5, "train": 1.2}


def dense_weight(out_features: int, in_features: int) -> torch.Tensor:
    """A random (out, in) weight with a decaying spectrum, like a trained one (ranks matter for the SVDs)."""
    n = min(out_features, in_features)
    s = torch.logspace(0, -2, n)
    return (torch.randn(out_features, n) * s) @ torch.randn(n, in_features) / (n * in_features) ** 0.5


def gblr_scattered(in_features: int, out_features: int, budget: float, seed: int):
    layer = build("gblr", in_features, out_features, budget, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.widths.copy_(torch.rand(layer.widths.shape, generator=generator))
        layer.locations.copy_(torch.rand(layer.locations.shape, generator=generator))
    project_widths([layer], budget * layer.dense_macs_per_token())
    return layer


def make_layers(out_features, in_features, budgets, kinds, device, scattered=False):
    """{(variant, budget): layer} for one shape; the dense weight and the layers are reused for every token count."""
    weight, bias = dense_weight(out_features, in_features), torch.randn(out_features) * 0.01
    layers = {("dense", 1.0): from_dense("dense", weight, bias)}
    for budget in budgets:
        for kind, options in (("lowrank", {}), ("monarch", {}), ("blast", {"steps": 0})):
            if kind in kinds:
                layers[(kind, budget)] = from_dense(kind, weight, bias, budget, **options)
        if "gblr" in kinds:
            layers[("gblr-init", budget)] = from_dense("gblr", weight, bias, budget, init="lowrank")
            layers[("gblr-random", budget)] = build("gblr", in_features, out_features, budget, seed=len(layers))
            if scattered:
                layers[("gblr-scattered", budget)] = gblr_scattered(in_features, out_features, budget, seed=len(layers))
    return {key: layer.to(device) for key, layer in layers.items()}


def interleaved_times(jobs: dict, repeats: int, cuda: bool, statistic=statistics.median, clock=time.perf_counter) -> dict:
    """{name: median (or ``statistic``) seconds} of ``repeats`` calls of every job after one warm-up call each.

    The jobs take turns (round-robin) so that load from other processes, which drifts over
    seconds, hits every variant alike instead of whichever happened to run during a busy spell.
    A job that raises is dropped and its error returned in place of a time.
    """
    samples, errors = {name: [] for name in jobs}, {}
    for name, fn in jobs.items():
        try:
            fn()
        except Exception as error:  # keep the benchmark going; the row records why
            errors[name] = repr(error)
    for _ in range(repeats):
        for name, fn in jobs.items():
            if name in errors:
                continue
            if cuda:
                torch.cuda.synchronize()
            start = clock()
            fn()
            if cuda:
                torch.cuda.synchronize()
            samples[name].append(clock() - start)
    return {name: errors.get(name) or statistic(times) for name, times in samples.items()}


def timed_calls(module, x, grad, amp, backward: bool, reference: bool = False) -> dict:
    """{"fwd": forward under no_grad, "fwdbwd": one training step into x and every parameter}."""
    def forward():
        with torch.no_grad(), amp():
            module(x)

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        with amp():
            y = module(x)
        y.backward(grad.to(y.dtype))

    def reference_step():  # GBLR on the plain autograd path
        module.zero_grad(set_to_none=True)
        x.grad = None
        with amp():
            y = module.apply_weight_reference(x)
            y = y if module.bias is None else y + module.bias
        y.backward(grad.to(y.dtype))

    if reference:
        return {"fwdbwd": reference_step}
    return {"fwd": forward, "fwdbwd": step} if backward else {"fwd": forward}


def run(args) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    kinds = set(args.kinds.split(","))
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = []
    for shape in args.shapes.split(","):
        out_features, in_features = map(int, shape.split("x"))
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        layers = make_layers(out_features, in_features, budgets, kinds, device, args.scattered)
        print(f"[{shape}] built {len(layers)} layers in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        for tokens in [int(t) for t in args.tokens.split(",")]:
            repeats = max(1, round(args.repeats * min(1.0, 4096 / tokens)))
            x = torch.randn(tokens, in_features, device=device, requires_grad=True)
            grad = torch.randn(tokens, out_features, device=device)
            block, jobs = [], {}
            for (variant, budget), layer in layers.items():
                forms = [("train", layer)]
                if variant.startswith("gblr") and args.reference:
                    forms.append(("train-ref", layer))
                if variant.startswith("gblr"):
                    try:
                        with amp():  # auto picks on this device and dtype, at most 4096 tokens
                            forms.append(("infer", to_inference(layer, "auto", tokens=min(tokens, 4096))))
                    except Exception as error:  # keep the benchmark going; the row records why
                        block.append(dict(shape=shape, tokens=tokens, variant=f"{variant} infer", kind=variant,
                                          form="infer", budget=budget, error=repr(error)))
                for form, module in forms:
                    name = variant if variant in ("dense", "lowrank", "monarch", "blast") else f"{variant} {form}"
                    row = dict(shape=shape, tokens=tokens, variant=name, kind=variant, form=form, budget=budget,
                               repeats=repeats, mac_ratio=module.macs_per_token() / module.dense_macs_per_token())
                    if form == "infer":
                        row.update(variant=f"{name}({module.mode})", mode=module.mode,
                                   executed_ratio=module.executed_macs_per_token() / module.dense_macs_per_token(),
                                   auto_timings_ms={k: 1e3 * v for k, v in module.timings.items()})
                    calls = timed_calls(module, x, grad, amp, backward=form != "infer", reference=form == "train-ref")
                    for what, fn in calls.items():
                        jobs[(len(block), what)] = fn
                    block.append(row)
            print(f"  {shape} T={tokens}: timing {len(jobs)} calls x {repeats} repeats", file=sys.stderr, end="")
            start, statistic = time.perf_counter(), min if args.stat == "min" else statistics.median
            clock = time.thread_time if args.clock == "cpu" else time.perf_counter
            for (index, what), value in interleaved_times(jobs, repeats, cuda, statistic, clock).items():
                if isinstance(value, str):
                    block[index]["error"] = value
                else:
                    block[index][f"{what}_ms"] = 1e3 * value
            print(f" ... {time.perf_counter() - start:.0f}s", file=sys.stderr)
            dense = block[0]
            for row in block:
                if "fwd_ms" in row:
                    row["fwd_ratio"] = row["fwd_ms"] / dense["fwd_ms"]
                    row["fwd_over_mac"] = row["fwd_ratio"] / row["mac_ratio"]
                if "fwdbwd_ms" in row:
                    row["fwdbwd_ratio"] = row["fwdbwd_ms"] / dense["fwdbwd_ms"]
            rows += block
    return dict(meta=meta(args, device), rows=rows, targets=targets(rows, device), summary=summary(rows))


def targets(rows: list[dict], device) -> list[dict]:
    """The speed targets at 4096 tokens (TARGETS: defined for CPU; on CUDA they are informational)."""
    checks = []
    for row in rows:
        if row["tokens"] != 4096 or "error" in row or row.get("kind") == "dense":
            continue
        if row["kind"] in ("lowrank", "monarch", "blast"):
            what, value, limit = "fwd ratio / MAC ratio", row["fwd_over_mac"], TARGETS[row["kind"]]
        elif row["form"] == "infer":
            what, value, limit = "fwd ratio / MAC ratio", row["fwd_over_mac"], TARGETS["infer"]
        elif row["form"] == "train-ref":
            continue
        else:
            what, value, limit = "fwd+bwd / dense", row["fwdbwd_ratio"], TARGETS["train"]
        checks.append(dict(shape=row["shape"], variant=row["variant"], budget=row["budget"], device=device.type,
                           metric=what, value=value, limit=limit, passed=value <= limit))
    return checks


def meta(args, device) -> dict:
    info = dict(args=vars(args), device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
                cpus=os.cpu_count(), loadavg_start=args.loadavg_start, loadavg_end=os.getloadavg(),
                dtype="bf16 autocast" if device.type == "cuda" else "fp32", platform=platform.platform(),
                processor=platform.processor(), time=time.strftime("%Y-%m-%d %H:%M:%S"))
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def fmt(value, spec):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


COLUMNS = [("mac_ratio", ".3f", 5), ("fwd_ms", ".2f", 9), ("fwd_ratio", ".2f", 6), ("fwd_over_mac", ".2f", 6),
           ("fwdbwd_ms", ".2f", 9), ("fwdbwd_ratio", ".2f", 6)]


def print_table(result: dict) -> None:
    head = (f"{'shape':>9} {'tokens':>6} {'variant':<26} {'budget':>6} {'MACs':>5} {'fwd ms':>9} {'fwd/d':>6}"
            f" {'/MACs':>6} {'f+b ms':>9} {'f+b/d':>6}  note")
    meta = result["meta"]
    print(f"# {meta['device']} {meta['dtype']}, {meta['threads']} threads, torch {meta['torch']}, load average "
          f"{meta['loadavg_start'][0]:.1f} -> {meta['loadavg_end'][0]:.1f} on {meta['cpus']} cpus")
    print(f"{head}\n{'-' * len(head)}")
    for r in result["rows"]:
        note = r.get("error", "")
        if "executed_ratio" in r:
            note = f"executes {r['executed_ratio']:.3f} of dense MACs {note}"
        cells = [fmt(r.get(key), spec).rjust(width) for key, spec, width in COLUMNS]
        print(f"{r['shape']:>9} {r['tokens']:>6} {r['variant']:<26} {r['budget']:>6.2f} {' '.join(cells)}  {note}")
    print_summary(result["rows"])
    if result["targets"]:
        print(f"\n# targets at 4096 tokens (defined on CPU; this run: {result['meta']['device']})")
        for t in result["targets"]:
            print(f"{'PASS' if t['passed'] else 'FAIL'} {t['shape']:>9} {t['variant']:<26} b={t['budget']:.2f} "
                  f"{t['metric']} = {t['value']:.2f} (<= {t['limit']})")
        print(f"{sum(t['passed'] for t in result['targets'])}/{len(result['targets'])} targets hold")


SUMMARY = [("low-rank", "lowrank", "train"), ("Monarch", "monarch", "train"), ("BLAST", "blast", "train"),
           ("GBLR, random layout", "gblr-random", "infer"), ("GBLR, as initialized", "gblr-init", "infer")]


def summary(rows: list[dict]) -> dict:
    """{tokens: {"shape@budget": {column: forward time relative to dense / MAC ratio}}}, plus the
    GBLR training step relative to dense ("train <variant>") where it was timed."""
    table = {}
    for r in rows:
        if "fwd_over_mac" not in r and "fwdbwd_ratio" not in r:
            continue
        cells = table.setdefault(r["tokens"], {}).setdefault(f"{r['shape']}@{r['budget']:g}", {})
        for column, kind, form in SUMMARY:
            if r["kind"] == kind and r["form"] == form and "fwd_over_mac" in r:
                cells[column] = r["fwd_over_mac"]
        if r["kind"].startswith("gblr") and r["form"].startswith("train") and "fwdbwd_ratio" in r:
            cells[f"{r['form']} {r['kind'][5:]}"] = r["fwdbwd_ratio"]
    return table


def print_summary(rows: list[dict]) -> None:
    """The issue-style table: forward time relative to dense / MAC ratio (1.0 = as fast as the MACs)."""
    for tokens, table in summary(rows).items():
        extra = sorted({c for cells in table.values() for c in cells} - {c for c, _, _ in SUMMARY})
        columns = [c for c, _, _ in SUMMARY] + extra
        print(f"\n# {tokens} tokens: forward time relative to dense / MAC ratio (GBLR inference via "
              f"to_inference(mode='auto')); train*: GBLR fwd+bwd time / dense fwd+bwd")
        print("| shape (out×in) @ budget | " + " | ".join(columns) + " |")
        print("|---" * (len(columns) + 1) + "|")
        for key, cells in table.items():
            if key.endswith("@1"):
                continue
            shape, budget = key.split("@")
            print(f"| {shape.replace('x', '×')} @ {budget} | " + " | ".join(fmt(cells.get(c), ".2f") for c in columns) + " |")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", help=f"comma-separated OUTxIN (default {FULL['shapes']})")
    parser.add_argument("--tokens", help=f"comma-separated token counts (default {FULL['tokens']})")
    parser.add_argument("--budgets", help=f"comma-separated budgets in (0, 1] (default {FULL['budgets']})")
    parser.add_argument("--kinds", default="dense,lowrank,monarch,blast,gblr", help="dense is always timed (reference)")
    parser.add_argument("--repeats", type=int, help="median of N after a warm-up; scaled by 4096/tokens above 4096 "
                                                    f"tokens (default {FULL['repeats']})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="JSON path (default results/bench_layers_<device>.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="per-call statistic; min is steadier on a machine shared with other work")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: the thread's CPU time (steadier on shared cores with --threads 1)")
    parser.add_argument("--reference", action="store_true",
                        help="also time GBLR's training step on the plain autograd path (train-ref)")
    parser.add_argument("--scattered", action="store_true",
                        help="also a GBLR layout of mixed random widths projected to the budget")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out = args.out or os.path.join("results", f"bench_layers_{torch.device(args.device).type}.json")
    args.loadavg_start = os.getloadavg()
    if args.loadavg_start[0] > 1.0 and not args.device.startswith("cuda"):
        print(f"note: load average {args.loadavg_start[0]:.1f} on {os.cpu_count()} cpus before the run: other work "
              "shares the cores and the times will be noisy (try --threads 1 --stat min)", file=sys.stderr)
    result = run(args)
    print_table(result)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    temporary = f"{args.out}.tmp{os.getpid()}"
    with open(temporary, "w") as file:
        json.dump(result, file, indent=1)
    os.replace(temporary, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
