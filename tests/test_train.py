"""The training loop's pieces: parameter groups and the learning-rate schedule."""
import math

import pytest

from gblr.models import build_vit
from gblr.surgery import replace_layers
from gblr.budget import Budget
from gblr.train import lr_factor, param_groups


def test_three_parameter_groups_with_the_structure_apart():
    model, _ = build_vit("vit_tiny", depth=1)
    replace_layers(model, None, "gblr", 0.3)
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
