"""The Gaussian-Dirichlet (Gaudi) mask of Gaudi-GBLR (Lee & Kim, ICLR 2024, arXiv 2310.18882; docs/method.md).

A mask of length n selects a cyclic interval: ``m[t] = 1 if (t - L) mod n < W else 0`` for a width W
and a location L in elements. A boxcar has no gradient in W or L, so the paper writes it in the DFT
domain, where both sit inside a Dirichlet kernel, optionally damped by a Gaussian.
"""
import math

import torch


def hard_widths(widths: torch.Tensor, n: int | torch.Tensor) -> torch.Tensor:
    """Whole-element widths ``clamp(round(w n), 0, n)`` (int64) of normalized widths ``w``; ``n`` an
    axis length, or a tensor of them broadcasting with ``widths``.

    This is the one rounding rule: the mask's forward pass and every MAC count use it.
    """
    n = torch.as_tensor(n, dtype=torch.float64, device=widths.device)
    return torch.minimum(torch.round(widths.detach().double() * n).clamp_min(0), n).long()


def hard_locations(locations: torch.Tensor, n: int) -> torch.Tensor:
    """Whole-element locations ``round(l n) mod n`` (int64) of normalized locations ``l``."""
    return torch.remainder(torch.round(locations.detach().double() * n), n).long()


def boxcar(widths: torch.Tensor, locations: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n) float32 cyclic boxcars of the rounded widths and locations, by direct indexing."""
    W = hard_widths(widths, n).int().unsqueeze(-1)
    L = hard_locations(locations, n).int().unsqueeze(-1)
    d = torch.arange(n, device=W.device, dtype=torch.int32) - L  # t - L, in (-n, n)
    # (t - L) mod n < W without the modulo (half the time): d < W where d >= 0, d + n < W where d < 0
    return (((d >= 0) & (d < W)) | (d < W - n)).float()


def dirichlet_mask(w: torch.Tensor, l: torch.Tensor, n: int, sigma: float | None = None) -> torch.Tensor:
    """The paper's closed form (docs/method.md, "The Gaudi mask") at continuous (w, l), in the dtype of ``w``; (...) -> (..., n).

        M[k] = n w sinc(k w) / sinc(k / n) exp(-j pi k (2 l + w - 1/n)) G[k],   k = 0..n//2
        G[k] = exp(-k^2 / (2 sigma^2))  (1 when sigma is None),                mask = irfft(M, n)

    For integer W = w n and L = l n and no Gaussian this is the cyclic boxcar (the DFT of a boxcar
    is a phase-shifted Dirichlet kernel); for other w it rings. Its derivative in w is a
    band-limited impulse at the end edge, non-zero at w = 0, so a pruned interval can regrow.
    """
    k = torch.arange(n // 2 + 1, device=w.device, dtype=w.dtype)
    w, l = w.unsqueeze(-1), l.unsqueeze(-1)
    amplitude = n * w * torch.sinc(k * w) / torch.sinc(k / n)
    if sigma is not None:
        amplitude = amplitude * torch.exp(-k.square() / (2.0 * sigma**2))
    phase = math.pi * k * (2.0 * l + w - 1.0 / n)
    spectrum = torch.complex(amplitude * torch.cos(phase), -amplitude * torch.sin(phase))
    return torch.fft.irfft(spectrum, n=n, dim=-1)


def gaudi_mask(widths: torch.Tensor, locations: torch.Tensor, n: int, sigma: float | None = None) -> torch.Tensor:
    """Gaudi masks of length ``n`` for normalized widths and locations.

    Args:
        widths: (...) normalized widths w = W / n, in [0, 1] (clamped).
        locations: (...) normalized locations l = L / n (wrapped modulo 1).
        n: mask length in elements.
        sigma: std of the Gaussian in DFT bins, or None for no Gaussian.

    Returns:
        (..., n) float32 masks. The forward pass sees W and L rounded to whole elements; the
        gradient is that of ``dirichlet_mask`` at the rounded point (straight-through). With
        ``sigma=None`` the value is the cyclic boxcar itself, which the closed form equals there
        (tested in float64); taking it directly spares float32 round-off at large n.
    """
    widths, locations = torch.broadcast_tensors(widths.float(), locations.float())
    w_hard = hard_widths(widths, n).float() / n
    l_hard = hard_locations(locations, n).float() / n
    w = widths + (w_hard - widths).detach()
    l = locations + (l_hard - locations).detach()
    soft = dirichlet_mask(w, l, n, sigma)
    if sigma is not None:
        return soft
    return boxcar(w_hard, l_hard, n) + (soft - soft.detach())


def gaudi_mask_vjp(grad: torch.Tensor, widths: torch.Tensor, locations: torch.Tensor, n: int,
                   sigma: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(d/d widths, d/d locations) of ``(grad * gaudi_mask(widths, locations, n, sigma)).sum()``,
    in closed form: what autograd returns through ``gaudi_mask``, without its graph (tested).

    grad (..., n); widths, locations (...). The mask is irfft(M), M[k] = A[k] exp(-j phi[k])
    (``dirichlet_mask``) at the rounded point, so with Q = c rfft(grad) / n (c = 2 on the bins irfft
    counts twice, 1 on DC and Nyquist) the derivative in a parameter p is sum_k Re(conj(Q) dM/dp).
    With A = s sin(pi k w) / (pi k), s = n G / sinc(k / n), this sums to the band-limited value of
    grad at the interval's end edge (width) and at its end minus its start edge (location):

        d/dw = F(pi k (2 l + 2 w - 1/n)),   d/dl = d/dw - F(pi k (2 l - 1/n)),   F(psi) = sum_k Re(s Q e^{j psi})
    """
    dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    widths, locations = torch.broadcast_tensors(widths.to(dtype), locations.to(dtype))
    w = (hard_widths(widths, n).to(dtype) / n).unsqueeze(-1)
    l = (hard_locations(locations, n).to(dtype) / n).unsqueeze(-1)
    q = torch.fft.rfft(grad.to(dtype), n=n, dim=-1)
    bins = q.shape[-1]
    k = torch.arange(bins, device=q.device, dtype=dtype)
    weight = 2.0 / torch.sinc(k / n)  # s c / n: c / n = 2 / n inside, 1 / n on DC and Nyquist
    weight[0] = 1.0
    if n % 2 == 0:
        weight[-1] = weight[-1] / 2
    if sigma is not None:
        weight = weight * torch.exp(-k.square() / (2.0 * sigma**2))
    q_re, q_im = q.real * weight, q.imag * weight

    def evaluate(position):  # F at psi = pi k (2 position - 1/n), position (..., 1)
        psi = (math.pi * k) * (2.0 * position - 1.0 / n)
        return (q_re * torch.cos(psi) - q_im * torch.sin(psi)).sum(-1)

    grad_w = evaluate(l + w)
    return grad_w, grad_w - evaluate(l)
