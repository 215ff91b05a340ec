"""The global FLOP-weighted width projection."""
import pytest
import torch

from gblr.structure.budget import project_widths, soft_threshold_widths, uniform_project_widths
from gblr.layers import build


def scattered_layers(seed=0):
    torch.manual_seed(seed)
    layers = [build("gblr", i, o, 1.0, seed=k) for k, (o, i) in enumerate([(64, 64), (64, 256), (96, 288)])]
    with torch.no_grad():
        for layer in layers:
            layer.widths.uniform_(0, 1.2)  # some above 1: clamped
            layer.locations.uniform_(-1, 2)  # wrapped
    return layers


@pytest.mark.parametrize("budget", [0.02, 0.1, 0.25, 0.5, 0.9])
def test_projection_meets_the_total_budget_tightly(budget):
    layers = scattered_layers()
    dense = sum(layer.dense_macs_per_token() for layer in layers)
    before = sum(layer.macs_per_token() for layer in layers)
    tau = project_widths(layers, budget * dense)
    after = sum(layer.macs_per_token() for layer in layers)
    assert after <= budget * dense
    if before > budget * dense:
        assert tau > 0 and after >= 0.98 * budget * dense  # no width is cut more than needed
    for layer in layers:
        assert layer.widths.min() >= 0 and layer.widths.max() <= 1
        assert layer.locations.min() >= 0 and layer.locations.max() < 1


def test_projection_is_flop_weighted_and_leaves_a_feasible_model_alone():
    layers = scattered_layers()
    dense = sum(layer.dense_macs_per_token() for layer in layers)
    project_widths(layers, 0.3 * dense)
    widths = [layer.widths.detach().clone() for layer in layers]
    assert project_widths(layers, 0.3 * dense) == 0.0
    assert all(torch.equal(w, layer.widths) for w, layer in zip(widths, layers))
    # One tau for all: the same price cut leaves more normalized width on a short axis.
    before = torch.ones(2, 1)
    probe = [build("gblr", n, n, 1.0, K=1) for n in (32, 128)]
    for layer in probe:
        with torch.no_grad():
            layer.widths.copy_(before)
    soft_threshold_widths(probe, 1e-3)
    assert torch.allclose(1 - probe[0].widths, (1 - probe[1].widths) / 4)


def test_uniform_projection_holds_every_layer_to_its_own_budget():
    layers = scattered_layers()
    uniform_project_widths(layers, 0.2)
    for layer in layers:
        assert layer.macs_per_token() <= 0.2 * layer.dense_macs_per_token()


def test_projection_is_exact_with_bf16_widths():
    layers = [layer.to(torch.bfloat16) for layer in scattered_layers(1)]
    dense = sum(layer.dense_macs_per_token() for layer in layers)
    project_widths(layers, 0.3 * dense)
    assert sum(layer.macs_per_token() for layer in layers) <= 0.3 * dense


def test_a_model_below_its_budget_grows_back_to_it():
    layers = scattered_layers()
    dense = sum(layer.dense_macs_per_token() for layer in layers)
    project_widths(layers, 0.1 * dense)
    assert sum(layer.macs_per_token() for layer in layers) <= 0.1 * dense
    tau = project_widths(layers, 0.3 * dense, fill=True)
    after = sum(layer.macs_per_token() for layer in layers)
    assert tau < 0 and 0.98 * 0.3 * dense <= after <= 0.3 * dense
    assert project_widths(layers, 0.5 * dense) == 0.0  # without fill, a model within budget stays as it is
