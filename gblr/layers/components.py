"""GBLR's components as pure math: made from a dense weight (its SVD, or Monarch's blocks), and
their MACs (arXiv 2310.18882; docs/method.md, "The cost"). ``gblr.layers.gblr`` holds them as a layer,
``gblr.layers.fit`` fits them to a budget, ``gblr.layers.projection`` holds their cost to it."""
import torch

from .gaudi import hard_widths
from .lowrank import balance
from .monarch import monarch_sizes, project_to_monarch


def check_components(in_features: int, out_features: int, K: int | None, rank: int) -> int:
    """K (default: as many rank-``rank`` components as the smaller axis holds), or a ValueError."""
    K = min(in_features, out_features) // rank if K is None else K
    if not (isinstance(rank, int) and rank >= 1 and isinstance(K, int) and K >= 1) \
            or K * rank > min(in_features, out_features):
        raise ValueError(f"GBLR needs K >= 1 components of rank >= 1 with K * rank <= "
                         f"{min(in_features, out_features)} for a {out_features}x{in_features} layer, "
                         f"got K={K!r}, rank={rank!r}")
    return K


def svd_components(weight: torch.Tensor, K: int, rank: int, whiten: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(U (K, out, r), V (K, r, in)) in ``weight``'s dtype: component k holds the singular triplets
    k r .. k r + r - 1 of the (out, in) ``weight``, split evenly as U sqrt(S), sqrt(S) V^T. With
    ``whiten`` = (R, R_inv) of ``gram_root``, the triplets of W R, mapped back: V_k R_inv (the
    whitened SVD of ``svd_split``, component by component, each term's factors balanced)."""
    out_features, in_features = weight.shape
    w = weight.double() if whiten is None else weight.double() @ whiten[0].to(weight.device)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[: K * rank].sqrt()
    U = (u[:, : K * rank] * root).T.reshape(K, rank, out_features).transpose(1, 2)
    V = (root[:, None] * vh[: K * rank]).reshape(K, rank, in_features)
    if whiten is not None:
        U, V = balance(U, V @ whiten[1].to(weight.device))
    return U.to(weight.dtype), V.to(weight.dtype)


def monarch_components(weight: torch.Tensor, nblocks: int, K: int, gram: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Monarch projection of ``weight`` at ``nblocks`` blocks as at most K rank-1 components:
    (U (n, out, 1), V (n, 1, in), widths (2, n), locations (2, n)), n <= K.

    Monarch's block (j, i) of W is L_j[:, T] R_i[T, :] (``gblr.layers.monarch``), a sum of |T| rank-1
    pieces, each a column of L_j on output block j times a row of R_i on input block i: as a GBLR
    component on an s x p block it costs min(s + p, s p) MACs, so the b q pieces cost what Monarch
    does, b q (p + s) (less where blocks are cut by the padding). When there are more than K
    pieces the K largest are kept."""
    out_features, in_features = weight.shape
    R, L = project_to_monarch(weight.double(), nblocks, gram)
    p, q, s = monarch_sizes(in_features, out_features, nblocks)
    i = torch.arange(nblocks).repeat_interleave(q)  # input block of piece (i, t)
    t = torch.arange(q).repeat(nblocks)
    j, t_out = (i * q + t) % nblocks, (i * q + t) // nblocks  # its output block and inner index
    rows, cols = (out_features - j * s).clamp(0, s), (in_features - i * p).clamp(0, p)  # cut by the padding
    U = torch.zeros(len(i), out_features, dtype=torch.float64)
    V = torch.zeros(len(i), in_features, dtype=torch.float64)
    for n, (a, b) in enumerate(zip(rows.tolist(), cols.tolist())):
        U[n, j[n] * s:j[n] * s + a] = L[j[n], :a, t_out[n]]
        V[n, i[n] * p:i[n] * p + b] = R[i[n], t[n], :b]
    real = ((rows > 0) & (cols > 0)).nonzero().flatten()
    keep = real[(U[real].norm(dim=1) * V[real].norm(dim=1)).argsort(descending=True)[:K]]
    widths = torch.stack([rows[keep] / out_features, cols[keep] / in_features]).float()
    locations = torch.stack([(j[keep] * s) / out_features, (i[keep] * p) / in_features]).float()
    return (U[keep, :, None].to(weight.dtype), V[keep, None, :].to(weight.dtype), widths, locations)


def structure_macs(widths: torch.Tensor, sizes, ranks) -> torch.Tensor:
    """MACs per token of (..., 2, C) normalized widths (row 0 output axis) on axes of ``sizes``
    (2, C), summed over the C components -> (...); counted as ``macs_per_token`` counts them."""
    a, b = hard_widths(widths, sizes).unbind(-2)
    return component_macs(a, b, ranks).sum(-1)


def component_macs(a: torch.Tensor, b: torch.Tensor, rank) -> torch.Tensor:
    """MACs per token of components of hard widths a (output) and b (input): min(r (a + b), a b),
    which is 0 when either width is 0 (docs/method.md, "The cost")."""
    return torch.minimum(rank * (a + b), a * b)
