"""The weight types: budgets, exact forward, projections, dtypes, errors."""
import pytest
import torch

from gblr import layers
from gblr.layers import LAYERS, build, from_dense, svd_split, to_inference
from gblr.layers.monarch import monarch_macs

KINDS = ["dense", "lowrank", "monarch", "gblr", "blast"]
SHAPES = [(64, 64), (64, 256), (256, 64), (96, 288)]  # (out, in)
BUDGETS = [0.1, 0.25, 0.5, 0.9]


def dense_weight(out_features, in_features, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # A decaying spectrum, like trained weights, so that ranks matter.
    u, _ = torch.linalg.qr(torch.randn(out_features, out_features, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(in_features, in_features, generator=generator))
    s = torch.logspace(0, -2, min(out_features, in_features))
    return (u[:, : len(s)] * s) @ v[:, : len(s)].T


def assert_applies(layer, weight_in, bias):
    w = layer.to_dense()
    for shape in [(13, layer.in_features), (2, 5, layer.in_features)]:
        x = torch.randn(shape)
        expected = x @ w.T + bias
        assert layer(x).shape == expected.shape
        assert torch.allclose(layer(x), expected, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_kind_meets_its_budget_and_applies_to_dense(kind, shape, one_thread):
    out_features, in_features = shape
    weight, bias = dense_weight(*shape), torch.randn(out_features)
    for budget in BUDGETS:
        layer = from_dense(kind, weight, bias, budget=budget)
        assert isinstance(layer.macs_per_token(), int)
        assert layer.dense_macs_per_token() == in_features * out_features
        if kind == "dense":  # a dense layer ignores the budget
            assert layer.macs_per_token() == in_features * out_features
        else:
            assert 0 < layer.macs_per_token() <= budget * in_features * out_features
        assert 0 <= layer.projection_error <= 1
        assert_applies(layer, weight, bias)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(64, 256), (96, 288)])
def test_random_init_layers_meet_budget_and_apply_to_dense(kind, shape):
    out_features, in_features = shape
    for budget in [0.25, 0.5]:
        layer = build(kind, in_features, out_features, budget, bias=True)
        assert layer.projection_error is None
        if kind != "dense":
            assert layer.macs_per_token() <= budget * in_features * out_features
        assert_applies(layer, None, layer.bias.detach())
        # Initialized near nn.Linear's scale, so a from-scratch model trains.
        ratio = float(layer.to_dense().std() / torch.nn.Linear(in_features, out_features).weight.detach().std())
        assert 0.3 < ratio < 3, ratio


@pytest.mark.parametrize("shape", SHAPES)
def test_lowrank_reaches_the_eckart_young_error(shape):
    weight = dense_weight(*shape)
    s = torch.linalg.svdvals(weight.double())
    for budget in BUDGETS:
        layer = from_dense("lowrank", weight, budget=budget)
        r = layer.rank
        assert r == min(int(budget * shape[0] * shape[1] / sum(shape)), *shape)
        optimal = float(s[r:].square().sum().sqrt() / s.square().sum().sqrt())
        assert abs(layer.projection_error - optimal) < 1e-5


@pytest.mark.parametrize("kind,options", [("lowrank", {}), ("monarch", {}), ("monarch", {"nblocks": 3}),
                                          ("gblr", {}), ("dense", {})])
@pytest.mark.parametrize("shape", SHAPES)
def test_projections_are_idempotent(kind, options, shape):
    weight = dense_weight(*shape)
    once = from_dense(kind, weight, budget=0.3, **options).to_dense()
    twice = from_dense(kind, once, budget=0.3, **options)
    assert twice.projection_error < 1e-5
    assert torch.allclose(twice.to_dense(), once, atol=1e-5 * float(once.abs().max()))


def test_monarch_picks_the_fewest_blocks_within_the_budget():
    for (out_features, in_features) in SHAPES + [(768, 768), (3072, 768), (768, 3072)]:
        for budget in BUDGETS:
            layer = build("monarch", in_features, out_features, budget)
            limit = budget * in_features * out_features
            assert layer.macs_per_token() <= limit
            assert all(monarch_macs(in_features, out_features, b) > limit for b in range(1, layer.nblocks))
    # 51 blocks of 2 would pad a 64x64 layer to 102 (37% of their MACs on zeros); 22 blocks of 3 pad it to 66.
    assert build("monarch", 64, 64, 0.1).nblocks == 22
    # The paper's reference points: 2/b of dense for square layers, 1.25/b for 768x3072.
    assert monarch_macs(768, 768, 4) == 768 * 768 // 2
    assert monarch_macs(768, 3072, 4) * 4 == 1.25 * 768 * 3072
    assert monarch_macs(3072, 768, 4) * 4 == 1.25 * 768 * 3072


def test_monarch_projection_is_the_blockwise_svd_on_square_layers():
    # With b = 2 on a 64x64 matrix each of the 4 (32x32) blocks is a rank-16 product.
    weight = dense_weight(64, 64)
    layer = from_dense("monarch", weight, nblocks=2)
    expected = torch.zeros(64, 64)
    for j in range(2):
        for i in range(2):
            block = weight[32 * j: 32 * j + 32, 32 * i: 32 * i + 32]
            u, v = svd_split(block, 16)
            expected[32 * j: 32 * j + 32, 32 * i: 32 * i + 32] = u @ v
    assert torch.allclose(layer.to_dense(), expected, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_gblr_lowrank_init_matches_lowrank_at_the_same_budget(shape):
    weight = dense_weight(*shape)
    for budget in BUDGETS:
        gblr = from_dense("gblr", weight, budget=budget, init="lowrank")
        lowrank = from_dense("lowrank", weight, budget=budget)
        assert abs(gblr.projection_error - lowrank.projection_error) <= 0.01 * lowrank.projection_error
        assert gblr.macs_per_token() == lowrank.macs_per_token()
        a, b = gblr.hard_structure()
        pruned = (a * b == 0)
        k = torch.arange(len(a))[pruned]  # one element on one axis, alternating: they can regrow
        assert torch.equal(a[k], (k % 2 == 0).long()) and torch.equal(b[k], (k % 2 == 1).long())


def test_gblr_paper_settings_can_be_stated_exactly():
    # GPT-2's c_attn with a quarter of its components at full width: rank 192, as low-rank rank 192.
    layer = build("gblr", 768, 2304, 1.0, width_ratio=0.25, seed=0)
    assert layer.num_components == 768
    assert layer.macs_per_token() == 192 * (768 + 2304)
    weight = dense_weight(96, 288)
    layer = from_dense("gblr", weight, budget=1.0, rank_ratio=0.25)
    assert layer.macs_per_token() == from_dense("lowrank", weight, rank=24).macs_per_token()
    layer = from_dense("gblr", weight, budget=0.5, K=24, rank=4)
    assert layer.U.shape == (24, 96, 4) and layer.V.shape == (24, 4, 288) and layer.widths.shape == (2, 24)


def test_gblr_fit_meets_the_budget_and_lowers_its_error():
    weight = dense_weight(64, 96)
    start = layers.from_dense("gblr", weight, budget=0.25, init="fit", fit_steps=0)
    fitted = layers.from_dense("gblr", weight, budget=0.25, init="fit", fit_steps=300)
    assert fitted.macs_per_token() <= 0.25 * 64 * 96
    # The fit starts from the SVD components on their supports and keeps its best iterate: never
    # worse than its start, nor than low-rank at the same budget (Eckart-Young's optimum for rank).
    assert fitted.projection_error <= start.projection_error
    assert fitted.projection_error <= from_dense("lowrank", weight, budget=0.25).projection_error + 1e-6


def test_gblr_macs_follow_the_sum_of_widths_formula():
    layer = build("gblr", 40, 30, 1.0, K=4, rank=2, seed=0)
    with torch.no_grad():
        layer.widths.copy_(torch.tensor([[1.0, 0.5, 0.1, 0.0], [1.0, 0.05, 0.5, 1.0]]))
    # a = (30, 15, 3, 0), b = (40, 2, 20, 40): min(r (a + b), a b) = 140, 30, 46, 0
    assert layer.macs_per_token() == 140 + 30 + 46 + 0


@pytest.mark.parametrize("mode", ["blocks", "lowrank", "dense", "auto"])
@pytest.mark.parametrize("shape", [(64, 64), (64, 256), (96, 288)])
def test_gblr_inference_applies_the_same_matrix(mode, shape):
    out_features, in_features = shape
    layer = build("gblr", in_features, out_features, 0.3, seed=1)
    with torch.no_grad():  # a trained-looking structure: scattered widths and wrapping locations
        layer.widths.uniform_(0, 0.6)
        layer.widths[:, :5] = 0.0
        layer.locations.uniform_(0, 1)
    from gblr.structure.budget import project_widths
    project_widths([layer], 0.3 * in_features * out_features)
    fast = to_inference(layer, mode=mode, tokens=64)
    assert fast.macs_per_token() == layer.macs_per_token()
    for shape_x in [(17, in_features), (3, 4, in_features)]:
        x = torch.randn(shape_x)
        expected = layer(x).detach()
        assert torch.allclose(fast(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    grouped = to_inference(layer, mode="blocks", wide=0.0)  # both steps grouped by intervals
    assert grouped.executed_macs_per_token() <= 2 * layer.macs_per_token()  # the groups' padding only


def test_gblr_inference_of_the_lowrank_init_runs_low_rank_gemms():
    weight = dense_weight(96, 288)
    layer = from_dense("gblr", weight, budget=0.25)
    fast = to_inference(layer, mode="blocks")
    assert fast.executed_macs_per_token() == layer.macs_per_token()  # one group: no padding at all
    assert torch.allclose(fast.to_dense(), layer.to_dense(), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_layers_run_under_bf16_autocast_and_with_bf16_parameters(kind, one_thread):
    weight = dense_weight(64, 96)
    layer = from_dense(kind, weight, torch.randn(64), budget=0.3)
    x = torch.randn(4, 10, 96)
    reference = layer(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == reference.shape
    assert torch.allclose(y.float(), reference, atol=0.05 * float(reference.abs().max()))
    half = layer.to(torch.bfloat16)
    y = half(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), reference, atol=0.05 * float(reference.abs().max()))
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in half.parameters() if p.grad is not None)


@pytest.mark.parametrize("budget", [0, -0.5, 1.5, float("nan"), "abc", None, True])
def test_bad_budget_is_a_value_error_naming_value_and_range(budget):
    with pytest.raises(ValueError, match=r"budget must be a number in \(0, 1\].*got " + repr(budget).replace("(", r"\(")):
        from_dense("lowrank", torch.randn(8, 8), budget=budget)


def test_bad_inputs_are_value_errors_that_say_what_is_allowed():
    with pytest.raises(ValueError, match=r"unknown weight kind 'sparse'; choose one of \['blast', 'dense', 'gblr', 'lowrank', 'monarch'\]"):
        from_dense("sparse", torch.randn(8, 8))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\) to match weight \(8, 4\), got \(4,\)"):
        from_dense("lowrank", torch.randn(8, 4), torch.randn(4), budget=0.5)
    with pytest.raises(ValueError, match=r"weight must be a 2-D \(out, in\) tensor.*got \(8,\)"):
        from_dense("lowrank", torch.randn(8))
    with pytest.raises(ValueError, match=r"budget 0.01 is below the cheapest Monarch layout of a 64x64 layer: 0.03125 of dense at nblocks=64"):
        from_dense("monarch", torch.randn(64, 64), budget=0.01)
    with pytest.raises(ValueError, match=r"budget 0.01 is below one rank"):
        from_dense("lowrank", torch.randn(64, 64), budget=0.01)
    with pytest.raises(ValueError, match=r"nblocks must be an integer in \[1, 8\].*got 9"):
        from_dense("monarch", torch.randn(8, 16), nblocks=9)
    with pytest.raises(ValueError, match=r"K \* rank <= 8.*got K=8, rank=2"):
        from_dense("gblr", torch.randn(8, 16), K=8, rank=2)
    with pytest.raises(ValueError, match=r"GBLR init must be 'lowrank', 'fit' or 'monarch', got 'svd'"):
        from_dense("gblr", torch.randn(8, 16), init="svd")
    with pytest.raises(ValueError, match=r"inference mode must be one of"):
        to_inference(build("gblr", 8, 8), mode="fast")


def test_registry_lists_the_kinds():
    assert sorted(LAYERS) == sorted(KINDS)
