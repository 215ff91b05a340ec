"""The Gaudi mask: boxcar identity, Gaussian smoothing, gradients."""
import pytest
import torch

from gblr.layers import boxcar, dirichlet_mask, gaudi_mask, hard_locations, hard_widths
from gblr.layers.gaudi import gaudi_mask_vjp


def integer_cases(n):
    """All widths 0..n at locations that include wrap-around."""
    W = torch.arange(n + 1, dtype=torch.float64)
    L = (torch.arange(n + 1, dtype=torch.float64) * 7) % n  # many wrap: L + W > n
    return W, L


@pytest.mark.parametrize("n", [1, 2, 7, 8, 64, 97, 768])
def test_closed_form_is_the_cyclic_boxcar_at_integer_widths_and_locations(n):
    W, L = integer_cases(n)
    closed = dirichlet_mask(W / n, L / n, n)
    t = torch.arange(n)
    expected = (torch.remainder(t - L[:, None].long(), n) < W[:, None].long()).double()
    assert (closed - expected).abs().max() < 1e-6
    assert expected[W == n].min() == 1 and expected[W == 0].max() == 0  # width n is all ones, width 0 empty


@pytest.mark.parametrize("n", [7, 8, 97])
def test_gaudi_mask_rounds_to_whole_elements_and_equals_the_boxcar(n):
    w = torch.rand(200, dtype=torch.float32)
    l = torch.rand(200) * 3 - 1  # locations outside [0, 1) wrap
    mask = gaudi_mask(w, l, n)
    assert mask.shape == (200, n) and mask.dtype == torch.float32
    W = torch.round(w.double() * n).long()
    L = torch.remainder(torch.round(l.double() * n), n).long()
    expected = (torch.remainder(torch.arange(n) - L[:, None], n) < W[:, None]).float()
    assert torch.equal(mask, expected)
    assert torch.equal(boxcar(w, l, n), expected)


def test_closed_form_rings_between_whole_elements():
    # Why the forward pass rounds: at a non-integer width the closed form leaves [0, 1].
    mask = dirichlet_mask(torch.tensor(0.3 + 0.5 / 64, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64), 64)
    assert mask.max() > 1.01 and mask.min() < -0.01


def test_gaudi_mask_accepts_any_leading_shape():
    assert gaudi_mask(torch.rand(2, 3, 4), torch.rand(2, 3, 4), 16).shape == (2, 3, 4, 16)


@pytest.mark.parametrize("n", [64, 255])
def test_gaussian_mask_sums_to_width_converges_to_boxcar_and_stays_in_range(n):
    w = torch.tensor([0.25, 0.5, 0.8])
    l = torch.tensor([0.1, 0.9, 0.5])
    box = boxcar(w, l, n)
    distances = []
    for sigma in sorted({1.0, 2.0, 3.0, n / 16, n / 4, 16.0 * n}):
        mask = gaudi_mask(w, l, n, sigma=sigma)
        assert torch.allclose(mask.sum(-1), box.sum(-1), atol=1e-3)  # the DC bin is untouched
        if sigma <= n / 16:
            assert mask.min() >= -1e-3 and mask.max() <= 1 + 1e-3
        distances.append(float((mask - box).norm()))
    assert all(a > b for a, b in zip(distances, distances[1:]))
    assert distances[-1] < 1e-3 * distances[0]


@pytest.mark.parametrize("sigma", [None, 5.0])
def test_gradients_are_finite_and_nonzero_including_at_width_zero(sigma):
    n = 32
    widths = torch.tensor([0.0, 0.25, 1.0 / n, 0.9], requires_grad=True)
    locations = torch.tensor([0.3, 0.7, 0.0, 0.95], requires_grad=True)
    mask = gaudi_mask(widths, locations, n, sigma)
    # A loss that wants every mask larger everywhere: the width gradient must push widths up.
    (-mask.sum(-1) - mask[:, n // 3]).sum().backward()
    assert torch.isfinite(widths.grad).all() and torch.isfinite(locations.grad).all()
    assert (widths.grad != 0).all()
    assert widths.grad[0] < 0  # a pruned interval (width 0) is told to grow back
    assert (locations.grad[1:] != 0).all()  # a width-0 mask does not depend on where it sits


def test_width_gradient_is_an_impulse_at_the_end_edge():
    n = 64
    w = torch.tensor(0.25, requires_grad=True)
    l = torch.tensor(0.5)
    mask = gaudi_mask(w, l, n)
    grads = torch.stack([torch.autograd.grad(mask[t], w, retain_graph=True)[0] for t in range(n)])
    end = (32 + 16) % n  # first element past the interval
    peak = int(grads.abs().argmax())
    assert peak in (end - 1, end)
    assert torch.allclose(grads.sum(), torch.tensor(float(n)), rtol=1e-4)  # d(sum of mask)/dw = n


@pytest.mark.parametrize("n", [1, 2, 7, 8, 64, 97])
@pytest.mark.parametrize("sigma", [None, 3.0])
def test_closed_form_vjp_is_the_straight_through_gradient_of_the_mask(n, sigma):
    generator = torch.Generator().manual_seed(n)
    w = torch.rand(40, generator=generator)
    w[:3] = torch.tensor([0.0, 1.0, 1.0 / n])  # pruned, full and one-element intervals
    l = torch.rand(40, generator=generator) * 3 - 1
    grad = torch.randn(40, n, generator=generator, dtype=torch.float64)
    # float64 truth: the closed form's derivative at the rounded point, through autograd
    w_hard = (hard_widths(w, n).double() / n).requires_grad_()
    l_hard = (hard_locations(l, n).double() / n).requires_grad_()
    truth = torch.autograd.grad((dirichlet_mask(w_hard, l_hard, n, sigma) * grad).sum(), [w_hard, l_hard])
    exact = gaudi_mask_vjp(grad, w.double(), l.double(), n, sigma)
    for got, want in zip(exact, truth):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9 * n * float(grad.abs().max()))
    # float32: as close to the truth as autograd through gaudi_mask (the training path's reference)
    ww, ll = w.clone().requires_grad_(), l.clone().requires_grad_()
    reference = torch.autograd.grad((gaudi_mask(ww, ll, n, sigma) * grad.float()).sum(), [ww, ll])
    for got, ref, want in zip(gaudi_mask_vjp(grad.float(), w, l, n, sigma), reference, truth):
        scale = n * float(grad.abs().max())
        assert float((got.double() - want).abs().max()) <= 2 * float((ref.double() - want).abs().max()) + 1e-6 * scale
