"""Wall time and peak memory: one ViT-B training step per weight type, and the default run.

    python scripts/bench_vit_step.py                     # both parts: ~45 min on 2 CPU cores at load ~5
    python scripts/bench_vit_step.py --step --batch 16   # the step part only (~37 min at batch 64), smaller batch
    python scripts/bench_vit_step.py --default-run       # the default run only: ~7 min on 2 CPU cores at load ~4

--step: ViT-B/16 (timm vit_base_patch16_224, random init, no download) at 224 px. For each weight
type the paper's targets (q, k, v, fc1, fc2 of 12 blocks: 60 layers) become random-init
``gblr.layers.build(kind, in, out, budget)`` layers ("dense" is timm's model as is): replace_layers'
60 SVDs took 6 min for low-rank alone on 2 CPU cores, and a step costs the same whatever the weights
hold. One step is what ``gblr.run.train.train`` does per batch: forward, cross-entropy, backward, clip
at 1.0, AdamW over ``param_groups``, for GBLR ``Budget(model, budget).after_step``. Reported:
median seconds of --repeats steps after one warm-up, ratio to dense, images/s, peak memory. Each
kind runs in its own process (``--one KIND``) so its peak is its own: on CPU peak RSS (ru_maxrss)
and the part reached during the steps (activations, gradients, AdamW state); on CUDA
max_memory_allocated, with bf16 autocast. A dense fp32 step at batch 64 took ~140 s on 2 CPU cores
shared at load ~5, hence --repeats 2; a smaller --batch is faster (say so next to the numbers).

--default-run: ``python run.py out_dir=<tmp> cache_dir=<tmp>`` (vit_tiny on digits, GBLR at budget
0.3) with a cold cache, so the dense start is trained too: wall time, peak RSS (os.wait4) and, from
results.json, top-1, the dense start's top-1 and the replaced layers' relative MACs.

Prints tables and writes JSON (default results/bench_vit_step.json) atomically; a part not run
keeps its previous entry in that file.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn
from torch.nn import functional as F

from gblr.system.config import ROOT
from gblr.layers import GBLRLinear, StructuredLinear, build
from gblr.tasks.vision import build_timm
from gblr.system.files import versions, write_json
from gblr.tasks.vision import VIT_TARGETS, split_qkv
from gblr.structure.budget import Budget
from gblr.structure.optimizer import build_optimizer, training_groups

MIB = 1024  # ru_maxrss is in KiB on Linux


def machine() -> dict:
    return dict(threads=torch.get_num_threads(), cpus=os.cpu_count(), load_avg=os.getloadavg(),
                time=time.strftime("%Y-%m-%d %H:%M:%S"), **versions())


def structured_vit(kind: str, budget: float) -> tuple[nn.Module, int]:
    """ViT-B with the paper's targets as random-init ``kind`` layers (dense: timm's model as is).
    ``gblr-reference``: GBLR layers on the plain autograd path (masked factors and mask spectra kept
    for backward), the baseline of ``GBLRFunction``."""
    if kind == "gblr-reference":
        GBLRLinear.apply_weight = GBLRLinear.apply_weight_reference  # this process only (--one)
        kind = "gblr"
    model, _ = build_timm("vit_base")
    if kind == "dense":
        return model, 0
    split_qkv(model)  # q, k, v become three Linear(768, 768), as replace_layers does
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)
               and any(name.endswith("." + t) for t in VIT_TARGETS)]
    for name, old in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                build(kind, old.in_features, old.out_features, budget, bias=old.bias is not None))
    return model, len(targets)


def one_kind(args) -> dict:
    """Time training steps of one weight type in this process; returns one row."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model, replaced = structured_vit(args.one, args.budget)
    model.to(device).train()
    layers = [m for m in model.modules() if isinstance(m, StructuredLinear)]
    macs = [(m.macs_per_token(), m.dense_macs_per_token()) for m in layers] or [(1, 1)]  # dense: none replaced
    mac_ratio = sum(m for m, _ in macs) / sum(d for _, d in macs)
    budget = Budget(model, args.budget, structure_lr=1e-4)  # a no-op without GBLR layers
    groups = training_groups(model, 1e-4, 0.05, budget)
    optimizer = build_optimizer(groups)
    clipped = [p for group in groups if group.get("clip", True) for p in group["params"]]  # as train.clip_grad
    images = torch.randn(args.batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        nn.utils.clip_grad_norm_(clipped, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        budget.after_step(1.0)
        if cuda:
            torch.cuda.synchronize()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.repeats + 1):  # the first is the warm-up (and allocates AdamW's state)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        print(f"  {args.one} step {i}: {times[-1]:.2f} s", file=sys.stderr, flush=True)
    row = dict(kind=args.one, replaced_layers=replaced, mac_ratio=mac_ratio, warmup_s=times[0],
               step_s=statistics.median(times[1:]), times_s=times[1:],
               params=sum(p.numel() for p in model.parameters()))
    if cuda:
        row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        row["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB
        row["step_mib"] = row["peak_mib"] - rss_before  # what the steps added above the built model
    return row


def bench_steps(args) -> dict:
    rows, load_before = [], os.getloadavg()
    for kind in args.kinds.split(","):
        command = [sys.executable, os.path.abspath(__file__), "--one", kind, "--budget", str(args.budget),
                   "--batch", str(args.batch), "--repeats", str(args.repeats), "--device", args.device]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        if done.returncode:
            rows.append(dict(kind=kind, error=f"exit code {done.returncode}"))
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    dense = next((r for r in rows if r["kind"] == "dense" and "step_s" in r), None)
    for row in (r for r in rows if "step_s" in r):
        row["images_per_s"] = args.batch / row["step_s"]
        row["vs_dense"] = row["step_s"] / dense["step_s"] if dense else None
        row["peak_vs_dense"] = row["peak_mib"] / dense["peak_mib"] if dense else None
    return dict(command=" ".join(sys.argv), model="vit_base_patch16_224", img_size=224, batch=args.batch,
                budget=args.budget, repeats=args.repeats, device=args.device, load_avg_before=load_before,
                dtype="bf16 autocast" if args.device.startswith("cuda") else "fp32", rows=rows, **machine())


def bench_default_run(args) -> dict:
    """Time ``python run.py`` with a cold cache in a temporary folder; its peak RSS via os.wait4."""
    with tempfile.TemporaryDirectory(prefix="gblr_bench_") as tmp:
        command = [sys.executable, "run.py", f"out_dir={tmp}/run", f"cache_dir={tmp}/cache", *args.run_args]
        print(f"$ {' '.join(command)}", file=sys.stderr, flush=True)
        load_before, start = os.getloadavg(), time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        result = dict(command=" ".join(["python", *command[1:]]), wall_s=wall, peak_rss_mib=usage.ru_maxrss / MIB,
                      cpu_s=usage.ru_utime + usage.ru_stime, exit_code=os.waitstatus_to_exitcode(status),
                      load_avg_before=load_before, **machine())
        path = os.path.join(tmp, "run", "results.json")
        if os.path.exists(path):
            with open(path) as file:
                out = json.load(file)
            result.update(model=out["model"], data=out["data"], weight=out["weight"], budget=out["budget"],
                          top1=out["metrics"].get("top1"), start_top1=out["metrics"].get("start_top1"),
                          replaced_macs=out["flops"]["replaced"], run_time_s=out["time_s"])
    return result


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_tables(result: dict) -> None:
    if "step" in result:
        s = result["step"]
        print(f"# ViT-B/16 one training step: batch {s['batch']}, 224 px, budget {s['budget']}, {s['device']} "
              f"{s['dtype']}, {s['threads']} threads, median of {s['repeats']}; load "
              f"{fmt(s.get('load_avg_before', [None])[0], '.2f')} before / {s['load_avg'][0]:.2f} after")
        head = f"{'kind':<8} {'layers':>6} {'MACs':>6} {'s/step':>8} {'x dense':>7} {'img/s':>7} {'peak MiB':>9} " \
               f"{'x dense':>7} {'step MiB':>9}"
        print(f"{head}\n{'-' * len(head)}")
        for r in s["rows"]:
            if "error" in r:
                print(f"{r['kind']:<8} {r['error']}")
                continue
            print(f"{r['kind']:<8} {r['replaced_layers']:>6} {r['mac_ratio']:>6.3f} {r['step_s']:>8.2f} "
                  f"{fmt(r['vs_dense'], '.2f'):>7} {r['images_per_s']:>7.2f} {r['peak_mib']:>9.0f} "
                  f"{fmt(r.get('peak_vs_dense'), '.2f'):>7} {fmt(r.get('step_mib'), '.0f'):>9}")
    if "default_run" in result:
        d = result["default_run"]
        print(f"\n# default run (cold cache): {d['command']}\n"
              f"wall {d['wall_s']:.1f} s, CPU {d['cpu_s']:.1f} s, peak RSS {d['peak_rss_mib']:.0f} MiB, "
              f"exit {d['exit_code']}, load {d['load_avg_before'][0]:.2f} before / {d['load_avg'][0]:.2f} after")
        if "top1" in d:
            print(f"{d['model']} on {d['data']}, {d['weight']} @ budget {d['budget']}: top-1 {fmt(d['top1'], '.2f')} "
                  f"(dense start {fmt(d['start_top1'], '.2f')}), replaced-layer MACs {d['replaced_macs']:.4f}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", action="store_true", help="the ViT-B step part (default: both parts)")
    parser.add_argument("--default-run", action="store_true", help="the default-run part (default: both parts)")
    parser.add_argument("--kinds", default="dense,lowrank,monarch,gblr",
                        help="comma-separated; gblr-reference = GBLR on the plain autograd path")
    parser.add_argument("--budget", type=float, default=0.3, help="target MACs / dense MACs of the replaced layers")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after one warm-up; the median is reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--run-args", nargs="*", default=[], help="extra overrides for run.py, e.g. train.epochs=1")
    parser.add_argument("--out", default=os.path.join("results", "bench_vit_step.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: time one kind, print its row as JSON
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_kind(args)), flush=True)
        return {}
    both = not (args.step or args.default_run)
    result = {}
    if os.path.exists(args.out):
        with open(args.out) as file:
            result = json.load(file)
    if args.step or both:
        result["step"] = bench_steps(args)
    if args.default_run or both:
        result["default_run"] = bench_default_run(args)
    print_tables(result)
    write_json(args.out, result)
    print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
