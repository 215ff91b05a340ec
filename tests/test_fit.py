"""The budgeted GBLR fit (gblr.layers): it finds structure low-rank and Monarch cannot express, within budget."""
import importlib.util

import pytest
import torch

from gblr.system.config import ROOT
from gblr.structure.budget import project
from gblr.layers import fit_gblr
from gblr.layers.gaudi import hard_widths
from gblr.layers.gblr import component_macs
from gblr.layers import from_dense, relative_error
_spec = importlib.util.spec_from_file_location("bench_fit", ROOT / "scripts" / "bench_fit.py")
bench_fit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_fit)


@pytest.mark.parametrize("name", ["block_diag", "off_diag", "banded"])
def test_fit_beats_half_of_lowrank_and_monarch_on_exact_gblr_teachers(name):
    torch.set_num_threads(1)
    weight, exact_macs = bench_fit.teacher(name)
    budget = 0.25
    assert exact_macs <= budget * weight.numel()  # the teacher is a GBLR matrix within budget
    baseline = min(from_dense(kind, weight, budget=budget).projection_error for kind in ("lowrank", "monarch"))
    layer = fit_gblr(weight, None, budget)  # at the default steps
    assert layer.macs_per_token() <= budget * weight.numel()
    assert layer.projection_error == pytest.approx(relative_error(layer.to_dense(), weight))
    assert layer.projection_error < 0.5 * baseline, (layer.projection_error, baseline)


@pytest.mark.parametrize("shape,budget", [((48, 80), 0.1), ((64, 64), 0.25), ((80, 48), 0.5)])
def test_fit_never_exceeds_the_budget(shape, budget):
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=generator)
    bias = torch.randn(shape[0], generator=generator)
    for init in ("greedy", "full"):
        layer = fit_gblr(weight, bias, budget, steps=60, init=init)
        assert layer.macs_per_token() <= budget * shape[0] * shape[1]
        assert torch.equal(layer.bias.detach(), bias)


def macs(widths, sizes):
    a, b = hard_widths(widths, sizes)
    return int(component_macs(a, b, 1).sum())


def test_projection_meets_the_budget_and_leaves_zero_cost_widths_alone():
    generator = torch.Generator().manual_seed(0)
    sizes = torch.tensor([[64], [96]]).expand(2, 40)
    widths = torch.rand(2, 40, generator=generator, dtype=torch.float64)
    widths[1, :5] = 0.0  # components costing 0 whatever their output width
    for max_macs in (100, 500, 1500):
        new = project(widths.float(), sizes, 1, max_macs)[0].float()
        assert macs(new, sizes) <= max_macs
        assert torch.equal(new[0, :5], widths[0, :5].float())
        assert (new >= 0).all()
        cut = (new <= widths.float() + 1e-7) | ((new * sizes).round() == 1)  # or kept alive at one element
        assert cut.all()
    assert macs(project(widths.float(), sizes, 1, 500)[0].float(), sizes) >= 0.95 * 500
