"""Data parallel under torchrun: 2 CPU processes (gloo) match one process."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

import gblr.system.distributed
from gblr.system.config import ROOT
from gblr.run.train import train
from gblr.structure.optimizer import param_groups

SETTINGS = ["start.epochs=2", "train.epochs=1", "train.batch_size=64", "weight=gblr"]


def launch(prefix, out, cache_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*prefix, "run.py", f"out_dir={out}", f"cache_dir={cache_dir}", *SETTINGS], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800, env=env)
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
                          text=True, timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}
    assert sorted(results) == ["lowrank-b0.3-s0", "monarch-b0.3-s0"]
    assert all(r["flops"]["replaced"] <= 0.3 for r in results.values())
    assert (sweep / ".submitit").is_dir()  # the jobs went through submitit, not the basic launcher


SMALL = {"epochs": 2, "batch_size": 16, "grad_accum": 4, "lr": 0.05, "min_lr": 0.0, "clip_grad": 1.0, "amp": "off"}
STEPS = 2 * 64 // 16  # optimizer steps: 2 epochs of 64 points in global batches of 16


def train_small(rank: int = 0, world: int = 1, port: int = 0, out: str = "", counts=None):
    """Train a small MLP with ``SMALL`` on ``world`` gloo processes (this is one of them); rank 0
    saves its parameters, its history and the number of gradient and scalar all-reduces to ``out``."""
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        counts = {"buckets": 0, "rounds": 0, "scalar": 0}
        all_reduce = dist.all_reduce

        def count_buckets(state, bucket):  # DDP's gradient all-reduce (its default): one call per bucket per round
            counts["buckets"] += 1
            counts["rounds"] += bucket.is_last()
            averaged = bucket.buffer().div_(world)
            return all_reduce(averaged, async_op=True).get_future().then(lambda future: future.value()[0])

        class CountingDDP(nn.parallel.DistributedDataParallel):
            def __init__(self, module, **kwargs):
                super().__init__(module, **kwargs)
                self.register_comm_hook(None, count_buckets)

        def counting_all_reduce(tensor, *args, **kwargs):  # the loop's own: agreements, loss and eval sums
            counts["scalar"] += 1
            return all_reduce(tensor, *args, **kwargs)

        nn.parallel.DistributedDataParallel = CountingDDP
        dist.all_reduce = counting_all_reduce
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    data = TensorDataset(torch.randn(64, 6, generator=torch.Generator().manual_seed(1)),
                         torch.randn(64, 3, generator=torch.Generator().manual_seed(2)))
    outcome = train(model, data, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), lambda m: {}, SMALL,
                    groups=param_groups(model, SMALL["lr"], 0.01), seed=3, device=torch.device("cpu"), log=lambda line: None)
    if rank == 0 and out:
        torch.save({"params": [p.detach() for p in model.parameters()], "history": outcome["history"],
                    "counts": counts}, out)
    if world > 1:
        dist.destroy_process_group()
    return model, outcome


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_accumulation_all_reduces_gradients_once_per_optimizer_step(tmp_path):
    model, outcome = train_small()  # one process, the same global batches (first: the children inherit its imports)
    out = tmp_path / "ddp.pt"
    # fork: no CUDA here, and the children skip the imports; gloo over localhost
    mp.start_processes(train_small, args=(2, free_port(), str(out)), nprocs=2, join=True, start_method="fork")
    ddp = torch.load(out)
    # grad_accum=4: 4 micro-steps per optimizer step, one of them synchronised (no_sync on the others).
    assert ddp["counts"]["rounds"] == STEPS  # without no_sync: 4 * STEPS
    assert ddp["counts"]["buckets"] == STEPS  # a small model's gradients fit one bucket
    # The loop's own collectives: one agreement per step (non-finite loss, stop request), not one per
    # micro-step; per epoch the train-loss sum and the stop check.
    assert ddp["counts"]["scalar"] == STEPS + 2 * 2
    for got, want in zip(ddp["params"], model.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    assert [h["train_loss"] for h in ddp["history"]] == pytest.approx([h["train_loss"] for h in outcome["history"]],
                                                                       rel=1e-6)


def test_a_multi_task_slurm_job_exports_the_torchrun_variables_with_submitit(monkeypatch):
    # submitit writes os.environ itself: give it a copy, so that no RANK/WORLD_SIZE outlives the test
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    gblr.system.distributed._from_submitit()
    assert {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_WORLD_SIZE")} == \
        {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "gpu07", "LOCAL_WORLD_SIZE": "2"}
    assert "CUDA_VISIBLE_DEVICES" not in os.environ or os.environ["CUDA_VISIBLE_DEVICES"] != "1"  # all GPUs stay visible
    port = os.environ["MASTER_PORT"]
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    for key in ("WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(key)
    gblr.system.distributed._from_submitit()  # every task of the job derives the same port from the job id
    assert os.environ["MASTER_PORT"] == port and os.environ["RANK"] == "0"
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task job stays a plain process
    monkeypatch.delenv("WORLD_SIZE")
    gblr.system.distributed._from_submitit()
    assert "WORLD_SIZE" not in os.environ
