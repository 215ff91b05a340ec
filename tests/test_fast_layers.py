"""The fast forward paths of the low-rank and Monarch layers against a dense reference built
independently from their factors: forward and backward (into the input and every parameter),
fp32 to 1e-5 relative, and the Monarch block count against its budget."""
import pytest
import torch

from gblr.layers import build, monarch_macs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def monarch_dense(R: torch.Tensor, L: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """W (out, in) from the factors, entry by entry from the layout (gblr/layers/monarch.py docstring):
    middle element m = i q + t of input block i feeds output block j = m mod b at inner index m // b."""
    b, q, p = R.shape
    s = L.shape[1]
    W = torch.zeros(b * s, b * p, dtype=R.dtype)
    for i in range(b):
        for t in range(q):
            j, inner = (i * q + t) % b, (i * q + t) // b
            W = W.index_add(0, torch.arange(j * s, (j + 1) * s),
                            torch.nn.functional.pad(torch.outer(L[j, :, inner], R[i, t]), (i * p, (b - 1 - i) * p)))
    return W[:out_features, :in_features]


def check_against_dense(layer, dense_weight, x: torch.Tensor, params: list[torch.Tensor]):
    """The layer's forward and gradients equal those of x @ W.T + bias with W = dense_weight(params)."""
    x = x.detach().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    bias = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    y = layer(x)
    y_ref = x_ref @ dense_weight(*ref_params).T + (0 if bias is None else bias)
    assert y.shape == y_ref.shape
    assert rel(y, y_ref) < 1e-5
    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    assert rel(x.grad, x_ref.grad) < 1e-5
    for p, q in zip(params, ref_params):
        assert rel(p.grad, q.grad) < 1e-5
    if bias is not None:
        assert rel(layer.bias.grad, bias.grad) < 1e-5


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out_features, in_features, rank", [(48, 40, 7), (24, 96, 13), (96, 24, 5)])
def test_lowrank_forward_and_backward_match_its_dense_matrix(out_features, in_features, rank, bias):
    torch.manual_seed(0)
    layer = build("lowrank", in_features, out_features, bias=bias, rank=rank)
    assert torch.allclose(layer.to_dense(), layer.U @ layer.V)
    check_against_dense(layer, lambda U, V: U @ V, torch.randn(3, 5, in_features), [layer.U, layer.V])
    assert layer.macs_per_token() == rank * (in_features + out_features)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out_features, in_features, nblocks", [(64, 64, 4), (48, 96, 6), (96, 48, 4),
                                                                (50, 70, 3), (70, 50, 3), (33, 33, 5)])
def test_monarch_forward_and_backward_match_its_dense_matrix(out_features, in_features, nblocks, bias):
    torch.manual_seed(0)
    layer = build("monarch", in_features, out_features, bias=bias, nblocks=nblocks)
    dense = lambda R, L: monarch_dense(R, L, out_features, in_features)  # noqa: E731
    assert rel(layer.to_dense(), dense(layer.R.detach(), layer.L.detach())) < 1e-6
    x = torch.randn(3, 5, in_features)
    check_against_dense(layer, dense, x, [layer.R, layer.L])
    with torch.no_grad():  # the inference path (bias added in place)
        W = dense(layer.R, layer.L)
        assert rel(layer(x), x @ W.T + (0 if layer.bias is None else layer.bias)) < 1e-5
    layer.zero_grad()
    # An input in the layout the layer returns (tokens last in memory) takes the same path.
    transposed = torch.randn(in_features, 15).T.reshape(3, 5, in_features)
    check_against_dense(layer, dense, transposed, [layer.R, layer.L])


def test_monarch_output_feeds_the_next_monarch_layer_and_autograd():
    torch.manual_seed(0)
    first, second = build("monarch", 48, 96, nblocks=4), build("monarch", 96, 48, nblocks=4)
    x = torch.randn(2, 7, 48, requires_grad=True)
    y = second(torch.nn.functional.gelu(first(x)))
    W1 = monarch_dense(first.R, first.L, 96, 48)
    W2 = monarch_dense(second.R, second.L, 48, 96)
    y_ref = torch.nn.functional.gelu(x @ W1.T + first.bias) @ W2.T + second.bias
    assert rel(y, y_ref) < 1e-5
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    assert rel(g, g_ref) < 1e-5


@pytest.mark.parametrize("budget", [0.05, 0.1, 0.2, 0.3, 0.45, 0.5, 0.75])
def test_monarch_block_count_never_exceeds_the_budget(budget):
    for out_features, in_features in [(64, 64), (100, 37), (37, 100), (768, 768), (3072, 768), (768, 2304),
                                      (1000, 384), (257, 129)]:
        limit = budget * in_features * out_features
        if monarch_macs(in_features, out_features, min(in_features, out_features)) > limit:
            continue  # below the cheapest layout: an error, tested in test_layers
        layer = build("monarch", in_features, out_features, budget)
        b = layer.nblocks
        assert layer.macs_per_token() <= limit
        # No feasible layout with fewer, larger blocks (less of the budget spent on zero padding).
        assert all(monarch_macs(in_features, out_features, k) > limit for k in range(1, b))


def test_monarch_training_graph_has_no_in_place_copy_of_the_output():
    # An in-place bias add on the output view would make autograd copy the whole output in backward.
    layer = build("monarch", 48, 96, nblocks=4)
    seen, stack = set(), [layer(torch.randn(6, 48, requires_grad=True)).grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack += [next_node for next_node, _ in node.next_functions]
    assert "CopySlices" not in {type(node).__name__ for node in seen}
