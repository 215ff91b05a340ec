"""The training loop's pieces: parameter groups, the learning-rate schedule, progress and metrics."""
import io
import math
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from gblr.tasks.vision import VIT_TARGETS, build_timm
from gblr.structure.surgery import replace_layers
from gblr.structure.budget import Budget
from gblr.run.train import lr_factor, train
from gblr.structure.optimizer import param_groups


def test_three_parameter_groups_with_the_structure_apart():
    model, _ = build_timm("vit_tiny", depth=1)
    replace_layers(model, VIT_TARGETS, "gblr", 0.3)
    budget = Budget(model, 0.3, structure_lr=0.02, structure_optimizer="adam")
    groups = param_groups(model, lr=1e-3, weight_decay=0.05, apart=budget.parameters()) + budget.param_groups()
    decayed, plain, structure = groups
    assert structure["lr"] == 0.02 and structure["betas"] == (0.0, 0.999) and structure["weight_decay"] == 0
    assert len(structure["params"]) == 2 * 5  # widths and locations of q, k, v, fc1, fc2
    assert all(p.ndim >= 2 for p in decayed["params"]) and decayed["weight_decay"] == 0.05
    assert plain["weight_decay"] == 0 and all(p.ndim <= 1 or p.shape[0] == 1 for p in plain["params"])
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_warms_up_linearly_then_decays_to_the_floor(schedule):
    total, warmup, floor = 110, 10, 0.01  # 100 decay steps
    factors = [lr_factor(s, total, warmup, floor, schedule) for s in range(total + 1)]
    assert factors[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert factors[warmup] == pytest.approx(1.0) and factors[total] == pytest.approx(floor)
    assert all(a >= b for a, b in zip(factors[warmup:], factors[warmup + 1:]))
    assert factors[warmup + 50] == pytest.approx(floor + (1 - floor) * 0.5)  # both are half-way at the middle
    quarter = lr_factor(warmup + 25, total, warmup, 0.0, schedule)
    assert quarter == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)) if schedule == "cosine" else 0.75)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def tiny_training(log_every: int, accum: int = 1):
    """A linear model on 64 random points, batches of 8: 8 optimizer steps per epoch, 2 epochs."""
    torch.manual_seed(0)
    model, data = nn.Linear(4, 2), TensorDataset(torch.randn(64, 4), torch.randn(64, 2))
    settings = {"epochs": 2, "batch_size": 8, "grad_accum": accum, "lr": 0.1, "min_lr": 0.001, "clip_grad": None,
                "amp": "off", "log_every": log_every}
    lines, reports = [], []
    outcome = train(model, data, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), lambda m: {"mse": 1.0}, settings,
                    groups=param_groups(model, 0.1, 0.0), seed=0, device=torch.device("cpu"), log=lines.append,
                    report=lambda metrics, step: reports.append((step, metrics)), desc="t")
    assert outcome["completed"]
    return lines, reports


def test_training_logs_every_n_steps_to_a_log_file_and_reports_train_and_val_metrics(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a Slurm log: not a terminal
    lines, reports = tiny_training(log_every=3, accum=2)
    progress = [line.split(":")[0] for line in lines if ", step " in line]
    assert progress == ["t epoch 1/2, step 3/8", "t epoch 1/2, step 6/8",
                        "t epoch 2/2, step 1/8", "t epoch 2/2, step 4/8", "t epoch 2/2, step 7/8"]
    assert sum(line.startswith("t epoch ") and ", step " not in line for line in lines) == 2  # the epoch lines
    steps = [step for step, _ in reports]
    assert steps == [3, 6, 8, 9, 12, 15, 16]  # optimizer steps across epochs; the epochs' reports at 8 and 16
    for step, metrics in reports:
        if step in (8, 16):
            assert set(metrics) == {"epoch", "train/epoch_loss", "val/mse"} and metrics["val/mse"] == 1.0
        else:  # the lr the step was taken with: the schedule's factor at step - 1 (no warm-up)
            assert metrics["train/lr"] == pytest.approx(0.1 * lr_factor(step - 1, 16, 0, 0.01))
            assert metrics["train/epoch"] == pytest.approx(step / 8) and math.isfinite(metrics["train/loss"])


def test_on_a_terminal_the_bar_replaces_the_progress_lines(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    lines, reports = tiny_training(log_every=3)
    assert not [line for line in lines if ", step " in line] and len(lines) == 2
    assert [step for step, _ in reports] == [3, 6, 8, 9, 12, 15, 16]  # wandb gets the same points


def test_log_every_must_be_a_positive_step_count():
    with pytest.raises(ValueError, match="train.log_every must be a positive number of optimizer steps, got 0"):
        tiny_training(log_every=0)
