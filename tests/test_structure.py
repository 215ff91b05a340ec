"""GBLR's structure mechanics: clipping that does not couple the structure and the weights, a
structure that can be frozen, a budget that is spent, and the share of MACs that moved."""
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from gblr.structure.budget import Budget, moved_macs_of, project_widths
from gblr.layers import GBLRLinear, from_dense
from gblr.run.train import train
from gblr.structure.optimizer import param_groups


def student(kind: str, budget: float) -> nn.Sequential:
    """Two 16x16 layers from one fixed dense start, converted to ``kind``."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
    return nn.Sequential(*[from_dense(kind, m.weight, m.bias, budget) if isinstance(m, nn.Linear) else m
                           for m in dense])


def fine_tune(model: nn.Module, clip_grad, structure_lr: float = 1e-2, learn: bool = True) -> Budget:
    """12 AdamW steps on a fixed regression task, as the runner composes them (structure apart)."""
    keeper = Budget(model, 0.5, structure_lr=structure_lr, learn=learn)
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(96, 16, generator=generator), torch.randn(96, 16, generator=generator))
    settings = {"epochs": 2, "batch_size": 16, "lr": 1e-2, "min_lr": 1e-4, "clip_grad": clip_grad, "amp": "off",
                "weight_decay": 0.05}
    groups = param_groups(model, 1e-2, 0.05, apart=keeper.parameters()) + keeper.param_groups()
    outcome = train(model, data, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), lambda m: {}, settings,
                    groups=groups, seed=0, device=torch.device("cpu"), hooks=[keeper], log=lambda line: None)
    assert outcome["completed"]
    return keeper


@pytest.mark.parametrize("clip_grad", [None, 0.05])
def test_frozen_gblr_trains_as_lowrank_with_clipping_on(clip_grad):
    # Budget 0.5 of a 16x16 layer is rank 4 exactly (4 x 32 = 128 MACs): nothing left to fill, so the
    # frozen GBLR layer is the low-rank layer, and must stay it through training (0.05 clips every step).
    lowrank, gblr = student("lowrank", 0.5), student("gblr", 0.5)
    fine_tune(lowrank, clip_grad)
    keeper = fine_tune(gblr, clip_grad, learn=False)
    assert not keeper.learn and keeper.param_groups() == []
    for low, structured in zip(lowrank[::2], gblr[::2]):
        assert structured.component_states()["active"] == low.rank == 4
        torch.testing.assert_close(structured.to_dense(), low.to_dense(), atol=1e-5, rtol=0)
        torch.testing.assert_close(structured.bias, low.bias, atol=1e-5, rtol=0)


def test_learned_structure_does_not_rescale_the_weights_steps():
    # With a tight clip, the weights' gradients are clipped to the same norm whether or not the
    # structure learns: their first step is the same in both runs.
    first = []
    for learn in (False, True):
        model = student("gblr", 0.5)
        keeper = Budget(model, 0.5, structure_lr=1.0, learn=learn)
        x, y = torch.randn(16, 16, generator=torch.Generator().manual_seed(2)), torch.randn(16, 16)
        groups = param_groups(model, 1e-2, 0.0, apart=keeper.parameters()) + keeper.param_groups()
        data = TensorDataset(x, y)
        settings = {"epochs": 1, "batch_size": 16, "lr": 1e-2, "min_lr": 1e-2, "clip_grad": 1e-3, "amp": "off"}
        train(model, data, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), lambda m: {}, settings,
              groups=groups, seed=0, device=torch.device("cpu"), log=lambda line: None)
        first.append(model[0].U.detach().clone())
    torch.testing.assert_close(first[0], first[1], atol=1e-7, rtol=0)


@pytest.mark.parametrize("how", ["structure_lr", "learn"])
def test_a_frozen_structure_never_moves(how):
    model = student("gblr", 0.3)  # converted at 0.3, held to 0.5: the budget's fill grows it once, at the start
    keeper = fine_tune(model, 1.0, **({"structure_lr": 0.0} if how == "structure_lr" else {"learn": False}))
    keeper.finish()
    assert sum(m.macs_per_token() for m in model[::2]) > 0.3 * 2 * 256
    for m, (widths, locations) in zip(model[::2], keeper.start):
        assert torch.equal(m.widths, widths) and torch.equal(m.locations, locations)
        assert not m.widths.requires_grad
    assert keeper.report()["moved_share"] == 0.0 and keeper.report()["learned"] is False


@pytest.mark.parametrize("mode", ["global", "uniform"])
@pytest.mark.parametrize("budget", [0.07, 0.1, 0.23, 0.3])
def test_every_gblr_model_is_on_its_budget_within_one_component(mode, budget):
    torch.manual_seed(0)
    layers = [from_dense("gblr", torch.randn(out, inp), None, budget) for out, inp in ((48, 48), (96, 48), (48, 96))]
    keeper = Budget(nn.ModuleList(layers), budget, mode=mode)
    for phase in ("start", "finish"):
        spent = sum(layer.macs_per_token() for layer in layers)
        largest = max(layer.in_features + layer.out_features for layer in layers)  # one whole rank-1 component
        if mode == "global":
            assert keeper.max_macs - largest < spent <= keeper.max_macs, phase
        else:
            for layer in layers:
                limit = budget * layer.dense_macs_per_token()
                assert limit - (layer.in_features + layer.out_features) < layer.macs_per_token() <= limit, phase
        keeper.finish()


def test_unspent_budget_goes_to_the_most_useful_free_components_first():
    # Two 32x32 layers at budget 0.1: rank 1 each (64 of 102.4 MACs). The room, 76.8 MACs, buys one
    # whole component (64), for the layer whose next singular value holds the larger share of its
    # energy: the steep spectrum's (0.8^2 of a geometric sum, about 23%), not the flat one's (about 3%).
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(32, 32))
    steep = u @ torch.diag(torch.logspace(0, -3, 32)) @ u.T
    flat = u @ torch.diag(torch.linspace(1, 0.9, 32)) @ u.T
    layers = [from_dense("gblr", w, None, 0.1) for w in (flat, steep)]
    assert [layer.macs_per_token() for layer in layers] == [64, 64]
    project_widths(layers, 0.1 * 2 * 32 * 32, fill=True)
    assert [layer.macs_per_token() for layer in layers] == [64, 128]  # the rest, 12.8, buys no useful part
    torch.testing.assert_close(layers[1].to_dense(), from_dense("lowrank", steep, None, rank=2).to_dense(),
                               atol=1e-5, rtol=0)


def test_moved_share_counts_the_cells_a_component_left():
    layer = GBLRLinear(torch.randn(2, 8, 1), torch.randn(2, 1, 8), torch.tensor([[0.5, 0.0], [0.5, 0.125]]),
                       torch.zeros(2, 2), None)
    widths0, locations0 = layer.widths.detach().clone(), layer.locations.detach().clone()
    assert moved_macs_of(layer, widths0, locations0) == (8.0, 0.0)  # a 4x4 block: min(4 + 4, 16) MACs
    with torch.no_grad():
        layer.locations[0, 0] = 0.25  # rows 2..5 instead of 0..3: half of its cells are new
    assert moved_macs_of(layer, widths0, locations0) == (8.0, 4.0)
    with torch.no_grad():
        layer.widths[0, 1] = 0.25  # the free component (no rows) becomes 2 x 1: all its cells are new
    assert moved_macs_of(layer, widths0, locations0) == (10.0, 6.0)


def test_partial_share_is_zero_for_a_lowrank_structure_and_counts_block_macs():
    from gblr.structure.budget import partial_share

    layer = from_dense("gblr", torch.randn(16, 16), None, 0.5)  # rank 4, every active component whole
    assert partial_share([layer]) == 0.0
    with torch.no_grad():
        layer.widths[:, 0] = 0.5  # one component becomes an 8 x 8 block: 16 of 3 x 32 + 16 MACs
    assert partial_share([layer]) == pytest.approx(16 / (3 * 32 + 16))
