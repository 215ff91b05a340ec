"""Activation-aware projections: with the Gram matrix G of a layer's inputs, every weight type
minimizes the output error tr(E G E^T), E = W - W_hat, within the same MACs."""
import pytest
import torch

from gblr.layers import LAYERS, from_dense
from gblr.layers.whiten import gram_root, output_error

SHAPE = (48, 80)  # (out, in)


def weight(seed=0):
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(SHAPE[0], SHAPE[0], generator=generator))
    v, _ = torch.linalg.qr(torch.randn(SHAPE[1], SHAPE[1], generator=generator))
    s = torch.logspace(0, -1.5, min(SHAPE))
    return (u[:, : len(s)] * s) @ v[:, : len(s)].T


def anisotropic_gram(seed=1):
    """X^T X of 400 tokens whose features have scales spread over two decades, correlated."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(400, SHAPE[1], generator=generator, dtype=torch.float64)
    x = x * torch.logspace(1, -1, SHAPE[1], dtype=torch.float64) @ torch.randn(SHAPE[1], SHAPE[1], generator=generator,
                                                                            dtype=torch.float64) / SHAPE[1] ** 0.5
    return x.T @ x


@pytest.mark.parametrize("kind,options", [("dense", {}), ("lowrank", {}), ("monarch", {}), ("gblr", {}),
                                          ("gblr", {"init": "fit", "fit_steps": 20})])
def test_an_identity_gram_reproduces_the_plain_projection(kind, options):
    torch.set_num_threads(1)
    W = weight()
    plain = from_dense(kind, W, budget=0.25, **options)
    aware = from_dense(kind, W, budget=0.25, gram=torch.eye(SHAPE[1]), **options)
    assert torch.allclose(aware.to_dense(), plain.to_dense(), atol=1e-6)
    assert aware.output_error == pytest.approx(plain.projection_error, abs=1e-6)
    assert plain.output_error is None


def test_aware_lowrank_is_the_closed_form_optimum_and_beats_the_plain_svd():
    W, G = weight(), anisotropic_gram()
    plain = from_dense("lowrank", W, budget=0.25)
    aware = from_dense("lowrank", W, budget=0.25, gram=G)
    assert aware.rank == plain.rank
    R, _ = gram_root(G)
    s = torch.linalg.svdvals(W.double() @ R)
    optimum = float(s[aware.rank:].square().sum().sqrt() / s.square().sum().sqrt())
    assert aware.output_error == pytest.approx(optimum, abs=1e-6)
    assert aware.output_error < 0.9 * output_error(plain.to_dense(), W, G)


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
def test_every_aware_projection_meets_the_budget_and_is_no_worse_than_plain(budget):
    torch.set_num_threads(1)
    W, G = weight(), anisotropic_gram()
    for kind, options in [("lowrank", {}), ("monarch", {}), ("gblr", {}), ("gblr", {"init": "fit", "fit_steps": 30})]:
        aware = from_dense(kind, W, budget=budget, gram=G, **options)
        assert aware.macs_per_token() <= budget * W.numel(), (kind, options)
        assert aware.output_error == pytest.approx(output_error(aware.to_dense(), W, G))
        plain = from_dense(kind, W, budget=budget, **options)
        assert aware.output_error <= output_error(plain.to_dense(), W, G) + 1e-6, (kind, options)


def test_the_aware_gblr_fit_is_never_worse_than_the_aware_lowrank():
    torch.set_num_threads(1)
    W, G = weight(), anisotropic_gram()
    lowrank = from_dense("lowrank", W, budget=0.25, gram=G)
    fitted = from_dense("gblr", W, budget=0.25, gram=G, init="fit", fit_steps=60)
    assert fitted.macs_per_token() <= 0.25 * W.numel()
    assert fitted.output_error <= lowrank.output_error + 1e-6
    # The GBLR low-rank start with a gram is the aware low-rank itself.
    start = from_dense("gblr", W, budget=0.25, gram=G)
    assert start.output_error == pytest.approx(lowrank.output_error, abs=1e-6)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_every_registered_kind_takes_a_gram(kind, one_thread):
    W, G = weight(), anisotropic_gram()
    layer = from_dense(kind, W, torch.zeros(SHAPE[0]), budget=0.5, gram=G)
    assert 0 <= layer.output_error <= 1
    x = torch.randn(3, SHAPE[1])
    assert torch.allclose(layer(x), x @ layer.to_dense().T, atol=1e-5)


def test_the_budgeted_fit_runs_through_the_layers_package():
    layer = from_dense("gblr", weight(), budget=0.25, init="fit", fit_steps=10)
    assert type(layer).__name__ == "GBLRLinear" and layer.macs_per_token() <= 0.25 * SHAPE[0] * SHAPE[1]
    with pytest.raises(ValueError, match=r"rank_ratio"):
        from_dense("gblr", weight(), budget=0.25, init="fit", rank_ratio=0.5)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_a_gram_of_the_wrong_shape_is_a_value_error_naming_it(kind):
    with pytest.raises(ValueError, match=r"gram must be the \(80, 80\) second moment.*got \(48, 48\)"):
        from_dense(kind, weight(), budget=0.5, gram=torch.eye(48))
