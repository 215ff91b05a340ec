"""Whole-model forward speed of the weight types: ViT-B/16 and GPT-2 small, against dense.

    python scripts/bench_model.py --quick                      # smoke run: tiny models, about a minute
    python scripts/bench_model.py                              # ViT-B/16 + GPT-2 small on CPU, ~10 min on 2 cores
    python scripts/bench_model.py --models vit --budgets 0.3   # one model, one budget
    python scripts/bench_model.py --device cuda --dtype bf16 --compile --vit-batch 64 --gpt2-batch 16

Every model is random init (no network; speed does not depend on the values). For each budget the
paper's layers (ViT: q, k, v, fc1, fc2; GPT-2: c_attn, c_fc, c_proj; ``gblr.structure.surgery``) are
converted with ``replace_layers`` and timed against the unconverted model:
    dense         the model as built (nn.Linear / Conv1D, the reference)
    lowrank       truncated-SVD factors at the budget's rank
    monarch       the fewest blocks within the budget
    blast         the budget's blocks and rank, unfitted (from_dense steps=0: the fit changes the
                  factors' values, not the forward's work; fitting ViT-B takes minutes on CPU)
    gblr          from_dense(init="lowrank") (the budget's top components at full width), then every
                  GBLR layer through ``to_inference(mode="auto")`` on the batch's token count (layers
                  of the same shape and structure reuse the first one's choice)
    gblr-random   the same with uniform random widths and locations projected onto the budget per
                  layer (a stand-in for a learned layout); not in the default --kinds: auto then
                  times every layer apart (minutes on CPU)
Forward only, under torch.no_grad; each time is the median (--stat min: minimum) of --repeats calls
after one warm-up, the variants of a model taking turns so that drifting load from other processes
hits all alike. Beside each time: the model's MACs per sample (``gblr.structure.macs.mac_report``: the
``model`` ratio is the whole forward over the same model dense) and, for GBLR, the MACs the
inference GEMMs execute. The CPU target (reported, never enforced): ViT-B/16 at budget 0.3 in
<= 0.6x dense time. Prints a table; writes JSON (default results/bench_model.json, on CUDA
results/bench_model_cuda.json) atomically.
"""
import argparse
import contextlib
import os
import platform
import statistics
import sys
import time

import torch

from bench_layers import interleaved_times  # noqa: E402  (scripts/ is on sys.path when run as a script)
from gblr.structure.budget import uniform_project_widths
from gblr.system.files import write_json
from gblr.structure.macs import mac_report
from gblr.layers import GBLRLinear, to_inference
from gblr.tasks.language import build_gpt2
from gblr.tasks.vision import build_timm
from gblr.structure.surgery import replace_layers, structured_layers

KINDS = ("lowrank", "monarch", "blast", "gblr", "gblr-random")
DEFAULT_KINDS = "lowrank,monarch,blast,gblr"  # gblr-random: auto times every layer apart, minutes more on CPU
OPTIONS = {"blast": {"steps": 0}}  # conversion options of a kind (speed does not depend on the values)
TARGET = dict(model="vit", budget=0.3, limit=0.6)  # ViT-B/16 at budget 0.3 in <= 0.6x dense time (CPU)
FULL = dict(models="vit,gpt2", budgets="0.3,0.5", repeats=5, vit="vit_base", gpt2="gpt2",
            vit_batch=8, gpt2_batch=4, gpt2_tokens=512)
QUICK = dict(models="vit,gpt2", budgets="0.3", repeats=2, vit="vit_tiny", gpt2="gpt2_tiny",
             vit_batch=8, gpt2_batch=2, gpt2_tokens=64)


def build(family: str, name: str, batch: int, tokens: int, device, seed: int):
    """(model in eval mode, example input, tokens per sample) for ``family`` vit or gpt2."""
    torch.manual_seed(seed)
    if family == "vit":
        model, _ = build_timm(name)
        size = model.patch_embed.img_size[0]
        x = torch.randn(batch, 3, size, size)
        per_sample = model.patch_embed.num_patches + model.num_prefix_tokens
    else:
        model, _ = build_gpt2(name)
        tokens = min(tokens, model.config.n_positions)
        x = torch.randint(0, model.config.vocab_size, (batch, tokens))
        per_sample = tokens
    return model.eval().to(device), x.to(device), per_sample


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def convert(model, kind: str, budget: float, tokens: int, seed: int, dtype) -> dict:
    """Replace the paper's layers in place by ``kind`` at ``budget`` and cast the model to ``dtype``;
    GBLR layers go through to_inference (which picks its mode by timing on this device and dtype).
    Returns notes: the inference modes chosen and the MACs the GEMMs execute (GBLR)."""
    with one_thread():  # the SVDs: with more threads than free cores, OpenMP waits can make them 100x slower
        replaced = replace_layers(model, None, "gblr" if kind.startswith("gblr") else kind, budget,
                                  **OPTIONS.get(kind, {}))
    model.to(dtype)
    if not kind.startswith("gblr"):
        return {}
    layers = [layer for _, layer in replaced]
    if kind == "gblr-random":
        generator = torch.Generator().manual_seed(seed)
        for layer in layers:
            layer.widths.copy_(torch.rand(layer.widths.shape, generator=generator))
            layer.locations.copy_(torch.rand(layer.locations.shape, generator=generator))
        uniform_project_widths(layers, budget)
    modes, executed, chosen = {}, 0, {}
    for name, layer in structured_layers(model):
        if isinstance(layer, GBLRLinear):
            # Layers of one shape and one structure (every block, as initialized) share auto's choice.
            key = (layer.out_features, layer.in_features, str(layer.widths.tolist()), str(layer.locations.tolist()))
            fast = to_inference(layer, chosen[key]) if key in chosen else to_inference(layer, "auto", tokens=tokens)
            chosen[key] = fast.mode
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, fast)
            modes[fast.mode] = modes.get(fast.mode, 0) + 1
            executed += fast.executed_macs_per_token()
    return {"modes": modes, "executed_replaced_macs_per_token": executed}


def macs(model, tokens: int) -> dict:
    report = mac_report(model, tokens)
    return {key: report[key] for key in ("macs", "dense_macs", "replaced_macs", "replaced_dense_macs",
                                         "replaced", "model")}


def bench_family(family: str, args, device, dtype) -> list[dict]:
    name, batch = getattr(args, family), getattr(args, f"{family}_batch")
    with one_thread():
        dense, x, per_sample = build(family, name, batch, args.gpt2_tokens, device, args.seed)
    dense.to(dtype)
    tokens = batch * per_sample
    variants = [("dense", 1.0, dense, {})]
    for budget in args.budgets:
        for kind in args.kinds:
            start = time.perf_counter()
            with one_thread():
                model, _, _ = build(family, name, batch, args.gpt2_tokens, device, args.seed)
            try:
                notes = convert(model, kind, budget, tokens, args.seed, dtype)
            except Exception as error:  # keep the benchmark going; the row records why
                variants.append((kind, budget, None, {"error": repr(error)}))
                continue
            notes["convert_s"] = time.perf_counter() - start
            variants.append((kind, budget, model, notes))
            print(f"  [{family}] {kind} b={budget}: converted in {notes['convert_s']:.0f}s", file=sys.stderr)
    rows, jobs = [], {}
    for index, (kind, budget, model, notes) in enumerate(variants):
        row = dict(network=name, family=family, kind=kind, budget=budget, batch=batch, tokens_per_sample=per_sample,
                   **notes)
        rows.append(row)
        if model is None:
            continue
        row["macs"] = macs(model, per_sample)
        runner = torch.compile(model) if args.compile else model
        jobs[index] = (lambda runner=runner: runner(x))
    statistic = min if args.stat == "min" else statistics.median
    print(f"  [{family}] timing {len(jobs)} models x {args.repeats} repeats, batch {batch}", file=sys.stderr)
    with torch.no_grad():
        times = interleaved_times(jobs, args.repeats, device.type == "cuda", statistic)
    for index, value in times.items():
        if isinstance(value, str):
            rows[index]["error"] = value
        else:
            rows[index]["fwd_ms"] = 1e3 * value
            rows[index]["samples_per_s"] = batch / value
    reference = rows[0].get("fwd_ms")
    for row in rows:
        if "fwd_ms" in row and reference:
            row["time_ratio"] = row["fwd_ms"] / reference
            row["time_over_macs"] = row["time_ratio"] / row["macs"]["model"]
    return rows


def target(rows: list[dict], device) -> list[dict] | None:
    """The CPU target's checks: every weight type of ViT at budget 0.3 against 0.6x dense time."""
    checks = [dict(network=row["network"], kind=row["kind"], budget=row["budget"], time_ratio=row["time_ratio"],
                   limit=TARGET["limit"], passed=row["time_ratio"] <= TARGET["limit"], device=device.type)
              for row in rows if row["family"] == TARGET["model"] and row["budget"] == TARGET["budget"]
              and row["kind"] != "dense" and "time_ratio" in row]
    return checks or None


def print_table(result: dict) -> None:
    meta = result["meta"]
    print(f"# {meta['device']} {meta['dtype']}, {meta['threads']} threads, torch {meta['torch']}"
          f"{', compiled' if meta['args']['compile'] else ''}, load average {meta['loadavg_start'][0]:.1f} -> "
          f"{meta['loadavg_end'][0]:.1f} on {meta['cpus']} cpus")
    head = (f"{'model':<22} {'weights':<12} {'budget':>6} {'batch':>5} {'GMACs/sample':>12} {'MACs/d':>6} "
            f"{'fwd ms':>9} {'samples/s':>9} {'time/d':>6} {'t/MACs':>6}  note")
    print(f"{head}\n{'-' * len(head)}")
    for r in result["rows"]:
        note = r.get("error", "")
        if "modes" in r:
            note = f"inference modes {r['modes']}; executes " \
                   f"{r['executed_replaced_macs_per_token'] * r['tokens_per_sample'] / 1e9:.4g} " \
                   f"GMACs/sample in the replaced layers (structure: {r['macs']['replaced_macs'] / 1e9:.4g})"

        def cell(key, spec, width):
            return (format(r[key], spec) if key in r else "-").rjust(width)

        gmacs, ratio = (format(r["macs"]["macs"] / 1e9, ".4g"), format(r["macs"]["model"], ".3f")) if "macs" in r else "--"
        print(f"{r['network']:<22} {r['kind']:<12} {r['budget']:>6.2f} {r['batch']:>5} {gmacs:>12} {ratio:>6} "
              f"{cell('fwd_ms', '.1f', 9)} {cell('samples_per_s', '.2f', 9)} {cell('time_ratio', '.3f', 6)} "
              f"{cell('time_over_macs', '.2f', 6)}  {note}")
    for t in result["targets"] or []:
        print(f"{'PASS' if t['passed'] else 'FAIL'} {t['network']} {t['kind']} b={t['budget']}: "
              f"time / dense = {t['time_ratio']:.3f} (<= {t['limit']}, defined on CPU; this run: {t['device']})")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help=f"comma-separated vit, gpt2 (default {FULL['models']})")
    parser.add_argument("--budgets", help=f"comma-separated budgets in (0, 1] (default {FULL['budgets']})")
    parser.add_argument("--kinds", default=DEFAULT_KINDS, help=f"weight types besides dense (always timed): "
                                                                  f"{', '.join(KINDS)}")
    parser.add_argument("--vit", help=f"ViT name (default {FULL['vit']})")
    parser.add_argument("--gpt2", help=f"GPT-2 name (default {FULL['gpt2']})")
    parser.add_argument("--vit-batch", type=int, help=f"images per forward (default {FULL['vit_batch']})")
    parser.add_argument("--gpt2-batch", type=int, help=f"sequences per forward (default {FULL['gpt2_batch']})")
    parser.add_argument("--gpt2-tokens", type=int, help=f"tokens per sequence (default {FULL['gpt2_tokens']})")
    parser.add_argument("--repeats", type=int, help=f"median of N after a warm-up (default {FULL['repeats']})")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the models' parameter dtype")
    parser.add_argument("--compile", action="store_true", help="time torch.compile(model) (after the warm-up call)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU (default 2)")
    parser.add_argument("--stat", choices=("median", "min"), default="median")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON path (default results/bench_model_<device>.json)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    families = args.models.split(",")
    for family in families:
        if family not in ("vit", "gpt2"):
            parser.error(f"--models takes vit and/or gpt2, got {family!r}")
    args.kinds = [k for k in args.kinds.split(",") if k != "dense"]
    for kind in args.kinds:
        if kind not in KINDS:
            parser.error(f"--kinds takes {', '.join(KINDS)}, got {kind!r}")
    try:
        args.budgets = [float(b) for b in args.budgets.split(",")]
    except ValueError:
        parser.error(f"--budgets must be comma-separated numbers in (0, 1], got {args.budgets!r}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    args.out = args.out or os.path.join("results", "bench_model.json" if device.type == "cpu"
                                        else f"bench_model_{device.type}.json")
    loadavg_start = os.getloadavg()
    rows = []
    for family in families:
        rows += bench_family(family, args, device, dtype)
    meta = dict(args={k: v for k, v in vars(args).items()}, device=str(device), dtype=args.dtype,
                torch=torch.__version__, threads=torch.get_num_threads(), cpus=os.cpu_count(),
                loadavg_start=loadavg_start, loadavg_end=os.getloadavg(), platform=platform.platform(),
                time=time.strftime("%Y-%m-%d %H:%M:%S"))
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    result = dict(meta=meta, rows=rows, targets=target(rows, device))
    print_table(result)
    write_json(args.out, result)
    print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
