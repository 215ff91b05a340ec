"""Surviving faults: preemption signals and non-finite losses."""
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
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
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
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert "nothing was saved: a rerun starts this training again" in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "stopped before fine-tuning began, nothing to resume: run the command again"
    assert not list((cache / "starts").glob("*.pt")) and not (out / "checkpoint.pt").exists()
