"""Tokens per second of one GPT-2 small training step per weight type, relative to dense.

    python scripts/bench_gpt2_step.py                          # CPU: batch 1 x 1024 tokens, ~5 min on 2 busy cores
    python scripts/bench_gpt2_step.py --batch 8 --repeats 10   # on a GPU (bf16 autocast)

GPT-2 small (``GPT2Config()`` defaults, random init: nothing is downloaded) at ``--seq`` tokens. Each
weight type is put in by the runner's own surgery (``replace_layers``) at the paper's point, read
from ``configs/experiment/gpt2_wikitext103_ft.yaml``: attn.c_attn, mlp.c_fc and mlp.c_proj of the
12 blocks (36 layers) as low-rank rank 192, Monarch 4 blocks, GBLR with a quarter of the components
at full width, the budget 7/22 of their dense MACs (43.75% in the paper convention). The SVDs of
that surgery take about a minute per weight type on 2 CPU cores; they are not timed.

One step is what ``gblr.run.train.train`` does per batch: forward, next-token cross-entropy, backward,
clip at 1.0, AdamW over ``param_groups``, and for GBLR the width projection onto the budget
(``Budget.after_step``). Reported: median seconds of --repeats steps after one warm-up step,
tokens/s, its ratio to dense, the analytic relative MACs (replaced layers; whole forward pass with
the LM head, which stays dense and is a quarter of GPT-2 small's MACs; paper convention), and on
CUDA the peak memory. bf16 autocast on CUDA, fp32 on CPU. GBLR training materializes each masked
W (as the paper does) whenever that is cheaper than the thin GEMMs, so its training step is not
faster than dense even though its structure costs 7/22 of the MACs.

Prints a table and writes JSON (default results/bench_gpt2_step.json) atomically.
"""
import argparse
import gc
import os
import statistics
import sys
import time

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F

from gblr.system.config import ROOT, compose
from gblr.structure.macs import count_macs
from gblr.tasks.language import build_gpt2
from gblr.system.files import versions, write_json
from gblr.structure.surgery import replace_layers
from gblr.structure.budget import Budget
from gblr.structure.optimizer import build_optimizer, training_groups

KINDS = ("dense", "lowrank", "monarch", "gblr")
PRESET = "gpt2_wikitext103_ft"


def paper_point(kind: str):
    """(targets, budget, options, train settings) of the paper preset for this weight type."""
    cfg = compose(f"experiment={PRESET}", f"weight={kind}")
    weight = OmegaConf.to_container(cfg.weight, resolve=True)
    options = {k: v for k, v in weight.get("options", {}).items() if v is not None}
    return list(cfg.model.targets), float(cfg.budget), options, cfg.train


def bench_kind(kind: str, args, device: torch.device) -> dict:
    """Time training steps of GPT-2 small with ``kind`` weights; returns one table row."""
    torch.manual_seed(0)
    targets, budget, options, t = paper_point(kind)
    model, weights = build_gpt2("gpt2", None)
    start = time.perf_counter()
    if kind != "dense":
        replace_layers(model, targets, kind, budget, **options)
    surgery_s = time.perf_counter() - start
    macs = count_macs(model, args.seq)
    model.to(device).train()
    keeper = Budget(model, budget, structure_lr=t.structure_lr or t.lr, structure_optimizer=t.structure_optimizer)
    groups = training_groups(model, t.lr, t.weight_decay, keeper)
    optimizer = build_optimizer(groups)
    clipped = [p for group in groups if group.get("clip", True) for p in group["params"]]  # as train.clip_grad
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    cuda = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        nn.utils.clip_grad_norm_(clipped, t.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        keeper.after_step(1.0)
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.repeats + 1):  # the first is the warm-up (and allocates AdamW's state)
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
        print(f"  {kind} step {i}: {times[-1]:.3f} s", file=sys.stderr, flush=True)
    row = dict(kind=kind, options=options, surgery_s=surgery_s, warmup_s=times[0], step_s=statistics.median(times[1:]),
               times_s=times[1:], params=sum(p.numel() for p in model.parameters()),
               relative_macs_replaced=macs["relative_replaced"] or 1.0, relative_macs_model=macs["relative_model"],
               relative_macs_paper=macs["paper"])
    row["tokens_per_s"] = args.batch * args.seq / row["step_s"]
    if cuda:
        row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    del model, optimizer, keeper
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def table(result: dict) -> str:
    head = ["weight", "step (s)", "tokens/s", "vs dense", "MACs replaced", "MACs model", "MACs paper"]
    if result["device"] == "cuda":
        head.append("peak MiB")
    rows = [head]
    for r in result["rows"]:
        line = [r["kind"], f"{r['step_s']:.3f}", f"{r['tokens_per_s']:.0f}",
                f"{r['speed_vs_dense']:.2f}x" if r.get("speed_vs_dense") else "-",
                f"{r['relative_macs_replaced']:.4f}", f"{r['relative_macs_model']:.4f}", f"{r['relative_macs_paper']:.4f}"]
        if result["device"] == "cuda":
            line.append(f"{r['peak_mib']:.0f}")
        rows.append(line)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [f"GPT-2 small, one training step, batch {result['batch']} x {result['seq']} tokens, {result['device']} "
             f"({result['dtype']}), median of {result['repeats']}"]
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated weight types (dense is the reference)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence (at most 1024)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda")
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "bench_gpt2_step.json"))
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    kinds = args.kinds.split(",")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not 1 <= args.seq <= 1024 or args.batch < 1 or args.repeats < 1:
        parser.error(f"--kinds from {KINDS} (got unknown {unknown}), --seq in [1, 1024], --batch and --repeats >= 1")

    rows = [bench_kind(kind, args, device) for kind in kinds]
    dense = next((r for r in rows if r["kind"] == "dense"), None)
    for row in rows:
        row["speed_vs_dense"] = row["tokens_per_s"] / dense["tokens_per_s"] if dense else None
    result = dict(command=" ".join(["python", *sys.argv]), model="gpt2 (GPT2Config(), random init)", batch=args.batch,
                  seq=args.seq, repeats=args.repeats, device=device.type,
                  device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                  dtype="bf16 autocast" if device.type == "cuda" else "fp32", rows=rows,
                  threads=torch.get_num_threads(), load_avg=os.getloadavg(), time=time.strftime("%Y-%m-%d %H:%M:%S"),
                  **versions())
    write_json(args.out, result)
    print(table(result))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
