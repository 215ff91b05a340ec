"""The input statistics of a layer, as the projections use them (docs/method.md, "Activation-aware
projection").

What a network feels of a layer's approximation W_hat is its output error on the layer's real inputs
x: sum over tokens of ||(W - W_hat) x||^2 = tr(E G E^T), E = W - W_hat, with G = sum x x^T (in x in),
the Gram matrix a calibration pass accumulates. With a root R of G (R R^T = G) that loss is the
Frobenius norm ||E R||_F^2, so a projection minimizing ||E||_F becomes one minimizing the output
error by working on W R and mapping back with R^-1.
"""
import torch


def check_gram(gram: torch.Tensor | None, in_features: int) -> torch.Tensor | None:
    """``gram`` as a float64 (in, in) tensor, or a ValueError naming its shape; None stays None."""
    if gram is None:
        return None
    if not isinstance(gram, torch.Tensor) or tuple(gram.shape) != (in_features, in_features):
        shape = tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__
        raise ValueError(f"gram must be the ({in_features}, {in_features}) second moment of the layer's inputs, "
                         f"got {shape}")
    if not bool(torch.isfinite(gram).all()):
        raise ValueError("gram has non-finite entries")
    return gram.detach().double()


def gram_root(gram: torch.Tensor, damping: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, R_inv): the symmetric square root of ``gram`` and its inverse, float64, so that
    ||E R||_F^2 = tr(E G E^T).

    From the eigen-decomposition (it never fails, unlike a Cholesky of a singular G): eigenvalues
    below ``damping`` times their mean are raised to it, so R_inv exists for any positive
    semi-definite G (directions no input reaches get a small weight instead of none). A zero G
    gives the identity: nothing is known of the inputs.
    """
    g = gram.detach().double()
    g = 0.5 * (g + g.T)
    values, vectors = torch.linalg.eigh(g)
    floor = damping * float(values.clamp_min(0).mean())
    if floor <= 0:
        eye = torch.eye(g.shape[0], dtype=torch.float64, device=g.device)
        return eye, eye
    values = values.clamp_min(floor)
    root = (vectors * values.sqrt()) @ vectors.T
    inverse = (vectors * values.rsqrt()) @ vectors.T
    return root, inverse


def block_roots(gram: torch.Tensor, nblocks: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, R_inv), each (nblocks, size, size) float64: ``gram_root`` of each diagonal block of the
    (in, in) ``gram`` after zero-padding its inputs to nblocks * size >= in. Padded inputs are always
    0, so any root will do for them: the identity's."""
    padded = torch.eye(nblocks * size, dtype=torch.float64, device=gram.device)
    padded[: gram.shape[0], : gram.shape[0]] = gram.double()
    roots = [gram_root(padded[i * size:(i + 1) * size, i * size:(i + 1) * size]) for i in range(nblocks)]
    return torch.stack([r for r, _ in roots]), torch.stack([r_inv for _, r_inv in roots])


def output_error(approx: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor | None) -> float:
    """Relative output error sqrt(tr(E G E^T) / tr(W G W^T)), E = approx - weight; with ``gram``
    None the relative Frobenius error (G = I)."""
    e, w = approx.double() - weight.double(), weight.double()
    if gram is None:
        num, den = e.square().sum(), w.square().sum()
    else:
        g = gram.double().to(w.device)
        num, den = ((e @ g) * e).sum(), ((w @ g) * w).sum()
    return float((num.clamp_min(0) / den).sqrt()) if den > 0 else 0.0
