"""GBLR's fast paths: every inference form and the training function apply the layer's matrix exactly."""
import pytest
import torch

from gblr.structure.budget import project_widths
from gblr.layers import build, from_dense, to_inference
from gblr.layers.gaudi import boxcar, dirichlet_mask, hard_locations, hard_widths
from gblr.layers.gblr import GBLRFunction
from gblr.layers.inference import CANDIDATES

FORMS = [(mode, options) for mode, options in CANDIDATES] + [
    ("blocks", {"chunk": 7, "block": 8}),  # several chunks, the last one partial; small output blocks
    ("blocks", {"wide": 0.0, "slack": 1.0}),  # every item grouped by output interval, no padding allowed
    ("blocks", {"wide": 1.1, "block": 5}),  # nothing counted as wide, block not dividing the axis
]


def layouts():
    """(name, layer) pairs covering the layouts the forms must handle."""
    torch.manual_seed(0)
    weight = torch.randn(48, 40) @ torch.diag(torch.logspace(0, -2, 40)) @ torch.randn(40, 40)
    yield "as initialized", from_dense("gblr", weight, torch.randn(48), budget=0.3)
    yield "random layout", build("gblr", 40, 48, 0.3, seed=1)
    scattered = build("gblr", 40, 48, 0.3, K=12, rank=2, seed=2)
    with torch.no_grad():  # mixed widths, wrapping intervals, dead, placeholder and full components
        scattered.widths.uniform_(0, 0.7)
        scattered.locations.uniform_(0, 1)
        scattered.widths[:, 0] = 0.0
        scattered.widths[0, 1] = 0.0
        scattered.widths[:, 2] = 1.0
        scattered.locations[:, 3] = 0.95
    project_widths([scattered], 0.5 * 40 * 48)
    yield "scattered", scattered
    dead = build("gblr", 40, 48, 0.3, bias=True, seed=3)
    with torch.no_grad():
        dead.widths.zero_()
    yield "no active component", dead


LAYOUTS = list(layouts())


def relative(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("name,layer", LAYOUTS, ids=[n for n, _ in LAYOUTS])
def test_every_inference_form_applies_to_dense_forward_and_backward(name, layer):
    w = layer.to_dense()
    bias = layer.bias.detach()
    for mode, options in FORMS:
        fast = to_inference(layer, mode=mode, **options)
        assert fast.macs_per_token() == layer.macs_per_token()
        x = torch.randn(2, 11, 40, requires_grad=True)
        y = fast(x)
        expected = x.detach() @ w.T + bias
        assert y.shape == expected.shape
        assert torch.allclose(y, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())), (mode, options)
        with torch.no_grad():
            assert torch.allclose(fast(x), y)
        g = torch.randn_like(y)
        y.backward(g)  # the frozen form is differentiable in its input and bias
        assert relative(x.grad, g @ w) < 1e-5, (mode, options)
        assert relative(fast.bias.grad, g.sum((0, 1))) < 1e-5


def test_auto_keeps_the_fastest_candidate_and_its_timings():
    layer = LAYOUTS[1][1]
    fast = to_inference(layer, mode="auto", tokens=64, repeats=1)
    chosen = [name for name in fast.timings if name.split(",")[0] == fast.mode]
    assert chosen and (fast.mode == "dense" or min(fast.timings[n] for n in chosen) <= 0.9 * fast.timings["dense"])
    assert "dense" in fast.timings and any(name.startswith("blocks") for name in fast.timings)
    assert torch.allclose(fast.weight(), layer.to_dense(), atol=1e-5 * float(layer.to_dense().abs().max()))


def test_lowrank_padding_adds_zero_components_only():
    layer = LAYOUTS[0][1]
    padded = to_inference(layer, mode="lowrank", pad=32)
    plain = to_inference(layer, mode="lowrank")
    assert padded.form.V.shape[0] % 32 == 0 and padded.form.V.shape[0] >= plain.form.V.shape[0]
    assert torch.equal(padded.form.V[plain.form.V.shape[0]:], torch.zeros_like(padded.form.V[plain.form.V.shape[0]:]))


def grads(layer, x, g, path):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = path(x)
    y.backward(g)
    return [y.detach(), x.grad] + [p.grad for p in (layer.U, layer.V, layer.widths, layer.locations)]


@pytest.mark.parametrize("sigma", [None, 3.0])
@pytest.mark.parametrize("tokens", [3, 400])  # two thin GEMMs / W formed
def test_training_function_has_the_reference_paths_gradients(sigma, tokens):
    layer = LAYOUTS[2][1]
    layer.sigma = sigma
    x, g = torch.randn(tokens, 40), torch.randn(tokens, 48)
    fast = grads(layer, x, g, layer.apply_weight)
    reference = grads(layer, x, g, layer.apply_weight_reference)
    layer.sigma = None
    for name, got, want in zip(["y", "x", "U", "V", "widths", "locations"], fast, reference):
        # widths and locations: float32 sums of the mask gradient in another order (closed form)
        assert relative(got, want) < (1e-4 if name in ("widths", "locations") else 1e-5), name
    a, b = layer.hard_structure()
    dead = (a == 0) & (b == 0)
    assert dead.any() and fast[4][:, dead].abs().max() == 0 and fast[2][dead].abs().max() == 0
    placeholder = (a == 0) & (b > 0)
    assert placeholder.any() and (fast[4][0, placeholder] != 0).all()  # it can regrow


def test_training_function_gradcheck_in_float64():
    layer = build("gblr", 10, 12, 0.5, K=5, rank=2, seed=4)  # 12 x 10: widths in elements of 12 and 10
    with torch.no_grad():  # dead, placeholder, wrapping and full components
        layer.widths.copy_(torch.tensor([[0.0, 0.0, 0.5, 1.0, 0.25], [0.0, 0.3, 0.4, 1.0, 0.6]]))
        layer.locations.copy_(torch.tensor([[0.1, 0.2, 0.9, 0.0, 0.5], [0.3, 0.8, 0.7, 0.0, 0.1]]))
    U, V = layer.U.detach().double().requires_grad_(), layer.V.detach().double().requires_grad_()
    widths, locations = layer.widths.detach().double(), layer.locations.detach().double()
    x = torch.randn(5, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, U, V: GBLRFunction.apply(x, U, V, widths, locations, None, torch.float64), (x, U, V))
    # widths and locations: the straight-through derivative of the closed form at the rounded point,
    # written out in float64 (the rounding has no derivative for gradcheck to find)
    widths.requires_grad_(), locations.requires_grad_()
    GBLRFunction.apply(x, U, V, widths, locations, None, torch.float64).sum().backward()
    w_hard = (torch.stack([hard_widths(widths[0], 12), hard_widths(widths[1], 10)]).double()
              / torch.tensor([[12.0], [10.0]])).requires_grad_()
    l_hard = (torch.stack([hard_locations(locations[0], 12), hard_locations(locations[1], 10)]).double()
              / torch.tensor([[12.0], [10.0]])).requires_grad_()
    masks = []
    for axis, n in ((0, 12), (1, 10)):
        soft = dirichlet_mask(w_hard[axis], l_hard[axis], n)
        masks.append(boxcar(w_hard[axis].detach(), l_hard[axis].detach(), n).double() + soft - soft.detach())
    W = torch.einsum("kor,kri->oi", U.detach() * masks[0][:, :, None], V.detach() * masks[1][:, None, :])
    (x.detach() @ W.T).sum().backward()
    assert (widths.grad[:, 2:] != 0).all() and widths.grad[0, 1] != 0  # active components and the placeholder
    assert torch.allclose(widths.grad, w_hard.grad, rtol=1e-9, atol=1e-9)
    assert torch.allclose(locations.grad, l_hard.grad, rtol=1e-9, atol=1e-9)


def saved_bytes(fn, x):
    """Bytes autograd keeps for backward while ``fn(x)`` runs, parameters excluded."""
    total = []

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and t.data_ptr() != x.data_ptr():
            total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(total)


def test_training_function_keeps_no_masks_or_masked_factors_for_backward():
    layer = build("gblr", 96, 64, 0.3, seed=0)  # 64 rank-1 components
    weight_bytes = 96 * 64 * 4
    for tokens in (4, 1000):  # thin GEMMs: nothing but x; W formed: W at most
        x = torch.randn(tokens, 96, requires_grad=True)
        assert saved_bytes(layer.apply_weight, x) <= weight_bytes
        # the plain autograd path keeps the masked factors (2 weights' worth here) and the masks' spectra
        assert saved_bytes(layer.apply_weight_reference, x) > 3 * weight_bytes


def test_inference_forms_follow_autocast():
    layer = LAYOUTS[2][1]
    x = torch.randn(30, 40)
    expected = x @ layer.to_dense().T + layer.bias.detach()
    for mode, options in FORMS:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = to_inference(layer, mode=mode, **options)(x)
        assert y.dtype == torch.bfloat16, (mode, options)
        assert torch.allclose(y.float(), expected, atol=0.02 * float(expected.abs().max())), (mode, options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_paths_in_bf16_on_cuda():
    layer = LAYOUTS[2][1].cuda()
    x = torch.randn(64, 40, device="cuda")
    expected = x @ layer.to_dense().T + layer.bias.detach()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for mode, options in FORMS:
            y = to_inference(layer, mode=mode, **options)(x)
            assert torch.allclose(y.float(), expected, atol=0.02 * float(expected.abs().max())), (mode, options)
        y = layer(x)
    assert torch.allclose(y.float(), expected, atol=0.02 * float(expected.abs().max()))
    layer.cpu()
