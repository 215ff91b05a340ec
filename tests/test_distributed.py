"""Data parallel under torchrun: 2 CPU processes (gloo) match one process."""
import json
import os
import subprocess
import sys

import pytest

from gblr.config import ROOT

SETTINGS = ["start.epochs=2", "train.epochs=1", "train.batch_size=64", "weight=gblr"]


def launch(prefix, out, cache_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*prefix, "run.py", f"out_dir={out}", f"cache_dir={cache_dir}", *SETTINGS], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.e2e
def test_two_process_torchrun_matches_one_process_with_the_same_global_batch(tmp_path, cache_dir):
    single = launch([sys.executable], tmp_path / "single", cache_dir)
    ddp = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                 tmp_path / "ddp", cache_dir)
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    # Same data per global step, gradients averaged, evaluation sums reduced: equal up to float
    # summation order, i.e. at most one of the 360 validation images may flip.
    for key in ["top1", "top5", "start_top1"]:
        assert abs(ddp["metrics"][key] - single["metrics"][key]) <= 100 / 360 + 1e-9
    assert ddp["history"][0]["train_loss"] == pytest.approx(single["history"][0]["train_loss"], rel=1e-3)
    assert ddp["flops"]["replaced"] <= 0.3
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir() if p.suffix in (".json", ".pt", ".safetensors")) == \
        ["checkpoint.pt", "model.json", "model.safetensors", "results.json"]  # one of each, written by rank 0


def test_a_multirun_through_the_submitit_local_launcher_finds_both_results(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "run.py", "-m", "launcher=local", "weight=lowrank,monarch", "dry_run=true",
                           f"cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}
    assert sorted(results) == ["lowrank-b0.3-s0", "monarch-b0.3-s0"]
    assert all(r["flops"]["replaced"] <= 0.3 for r in results.values())
    assert (sweep / ".submitit").is_dir()  # the jobs went through submitit, not the basic launcher
