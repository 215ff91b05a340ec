"""Surviving faults: preemption signals (in every phase of a run) and non-finite losses."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import gblr.run.runner
import gblr.tasks
from gblr.system.config import ROOT, compose
from gblr.run.runner import run

SETTINGS = ["start.epochs=3", "train.epochs=2", "train.batch_size=128", "weight=gblr"]


def signal_at(monkeypatch, step: int, signum=signal.SIGTERM):
    """Make the process receive ``signum`` during fine-tuning's ``step``-th loss evaluation."""
    original, calls = gblr.tasks.ImageClassification.loss, {"n": 0}

    def loss(self, model, batch):
        if model.training and any(p.requires_grad and p.ndim == 2 and p.shape[0] == 2 for p in model.parameters()):
            calls["n"] += 1  # fine-tuning only: the model has GBLR widths (2, K)
            if calls["n"] == step:
                os.kill(os.getpid(), signum)
        return original(self, model, batch)

    monkeypatch.setattr(gblr.tasks.ImageClassification, "loss", loss)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir):
    """The uninterrupted run the interrupted ones must match."""
    return run(compose(f"cache_dir={cache_dir}", *SETTINGS, f"out_dir={tmp_path_factory.mktemp('straight')}"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_preempted_run_resumes_mid_epoch_to_the_same_final_metrics(tmp_path, cache_dir, monkeypatch, straight,
                                                                      signum):
    common = [f"cache_dir={cache_dir}", *SETTINGS]
    with monkeypatch.context() as patch:
        signal_at(patch, 5, signum)  # 11 steps per epoch: mid-epoch 1
        stopped = run(compose(*common, f"out_dir={tmp_path / 'stopped'}"))
    assert stopped["completed"] is False
    state = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 0 and state["position"]["step"] == 5
    assert not (tmp_path / "stopped" / "results.json").exists()
    resumed = run(compose(*common, f"out_dir={tmp_path / 'stopped'}", "resume=true"))
    assert resumed["metrics"] == straight["metrics"]
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx([h["train_loss"] for h in straight["history"]])


def test_a_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir):
    # A subprocess, to see the exit code: fine-tuning's loss becomes NaN at epoch 2, step 3. It imports
    # gblr and run.py from the checkout through PYTHONPATH.
    script = tmp_path / "nan_run.py"
    script.write_text(
        "import torch\n"
        "import gblr.run.runner as runner\nimport gblr.tasks as tasks\n"
        "original, calls = tasks.ImageClassification.loss, [0]\n"
        "def loss(self, model, batch):\n"
        "    value = original(self, model, batch)\n"
        "    if model.training and any(n.endswith('widths') for n, _ in model.named_parameters()):\n"
        "        calls[0] += 1\n"
        "        if calls[0] == 11 + 3:\n"
        "            return value * float('nan')\n"
        "    return value\n"
        "tasks.ImageClassification.loss = loss\n"
        "import run\n"
        "run.main()\n")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), f"cache_dir={cache_dir}", f"out_dir={out}", *SETTINGS],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 3, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: non-finite loss (nan) at epoch 2, step 3 of 11;")
    assert f"{out / 'checkpoint.pt'} (epoch 1), is kept" in line
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert not (out / "results.json").exists()


def test_bad_steps_can_be_skipped_a_bounded_number_of_times(tmp_path, cache_dir, monkeypatch):
    original, calls = gblr.tasks.ImageClassification.loss, {"n": 0}

    def loss(self, model, batch):
        value = original(self, model, batch)
        if model.training and any(n.endswith("widths") for n, _ in model.named_parameters()):
            calls["n"] += 1
            if calls["n"] in (2, 4):
                return value * float("inf")
        return value

    monkeypatch.setattr(gblr.tasks.ImageClassification, "loss", loss)
    result = run(compose(f"cache_dir={cache_dir}", f"out_dir={tmp_path}", *SETTINGS, "train.max_bad_steps=2"))
    assert result["completed"] and result["flops"]["replaced"] <= 0.3


def test_a_stop_during_the_dense_start_exits_5_and_says_nothing_was_saved(tmp_path):
    # A subprocess, to see the exit code and the last line: SIGTERM at the dense start's third step.
    script = tmp_path / "stop_run.py"
    script.write_text(
        "import os, signal\n"
        "import gblr.tasks as tasks\n"
        "original, calls = tasks.ImageClassification.loss, [0]\n"
        "def loss(self, model, batch):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 3:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return original(self, model, batch)\n"
        "tasks.ImageClassification.loss = loss\n"
        "import run\n"
        "run.main()\n")
    cache, out = tmp_path / "cache", tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), f"cache_dir={cache}", f"out_dir={out}", *SETTINGS],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert "nothing was saved: a rerun starts this training again" in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("stopped by SIGTERM in the dense start, which is cached only when "
                                                    "finished: nothing to resume; run the command again: it trains the "
                                                    "dense start again")
    assert not list((cache / "starts").glob("*.pt")) and not (out / "checkpoint.pt").exists()


QUICK = ["start.epochs=2", "train.epochs=1", "train.batch_size=128", "weight=lowrank"]  # as tests/test_guarantees.py's


def run_signalled(target: str, args: list[str], signum: str = "SIGTERM") -> subprocess.CompletedProcess:
    """`python run.py ARGS` in which the process sends itself ``signum`` as ``target`` ('module:attribute',
    e.g. 'gblr.structure.budget:Budget.finish') is first called, before it runs: a deterministic point
    in that phase, with a real signal and the real handlers."""
    module, path = target.split(":")
    *owner_path, name = path.split(".")
    code = (f"import importlib, os, runpy, signal, sys\nowner = importlib.import_module({module!r})\n"
            f"for part in {owner_path!r}:\n    owner = getattr(owner, part)\n"
            f"original, calls = getattr(owner, {name!r}), [0]\n"
            "def patched(*args, **kwargs):\n    calls[0] += 1\n"
            f"    if calls[0] == 1:\n        os.kill(os.getpid(), signal.{signum})\n"
            "    return original(*args, **kwargs)\n"
            f"setattr(owner, {name!r}, patched)\nsys.argv = ['run.py', *{args!r}]\n"
            "runpy.run_path('run.py', run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})


PHASES = [  # (where the signal comes, what the line says, whether resume=true continues)
    ("gblr.structure.surgery:from_dense", "in the layer conversion (1/20 layers converted): nothing to resume; run "
     "the command again: it loads the cached dense start and converts again", False),
    ("gblr.structure.budget:Budget.finish", "in the final evaluation: resume=true continues {out} from its last "
     "checkpoint and evaluates and exports again", True),
    ("gblr.run.export:save", "in the export: resume=true continues {out} from its last checkpoint and evaluates and "
     "exports again", True),
]


@pytest.mark.parametrize("target, line, resumable", PHASES, ids=["conversion", "final-evaluation", "export"])
def test_a_stop_outside_training_exits_5_at_the_next_safe_point_and_the_rerun_finishes(tmp_path, cache_dir, target,
                                                                                        line, resumable):
    out = tmp_path / "run"
    args = [f"out_dir={out}", f"cache_dir={cache_dir}", *QUICK]
    stopped = run_signalled(target, args, "SIGUSR1" if resumable else "SIGTERM")
    assert stopped.returncode == 5, stopped.stderr[-2000:]
    signal_name = "SIGUSR1" if resumable else "SIGTERM"
    assert stopped.stderr.strip().splitlines()[-1] == f"stopped by {signal_name} " + line.format(out=out)
    assert not (out / "results.json").exists()
    if resumable:  # training's work is kept: its checkpoint holds the finished epoch
        assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1
    again = subprocess.run([sys.executable, "run.py", *args, *(["resume=true"] if resumable else [])], cwd=ROOT,
                           capture_output=True, text=True, timeout=1800,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-2000:]
    result = json.loads((out / "results.json").read_text())
    assert result["completed"] and len(result["history"]) == 1  # the resumed run kept the epoch it had trained
    assert "dense start loaded from" in again.stdout + again.stderr  # the finished dense start was not retrained
