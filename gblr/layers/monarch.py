"""Monarch weight (Dao et al., ICML 2022): two block-diagonal factors with a fixed permutation.

Layout for ``b`` blocks, any (out, in): the input is zero-padded to b p (p = ceil(in / b)), the
output to b s (s = ceil(out / b)), and the inner size per block is q = min(p, s).

    h_i = R_i x_i                (R: (b, q, p); block i of the input, i = 0..b-1)
    middle m = i q + t           (h flattened, length b q)
    block j of the output reads the middle elements m = t' b + j, t' = 0..q-1 (a stride-b shuffle)
    y_j = L_j h[j::b]            (L: (b, s, q))

Cost: b q (p + s) MACs per token (2/b of dense for square layers, 1.25/b for 768x3072). Block
(j, i) of W is L_j[:, S] R_i[T, :] with T = {t : (i q + t) mod b = j}, a rank-|T| product, and
every row of R / column of L belongs to exactly one block, so the best Monarch approximation is a
truncated SVD of each block: ``project_to_monarch`` (closed form, any shape, milliseconds).
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import StructuredLinear, add_bias, register, relative_error
from .whiten import block_roots, output_error


def monarch_sizes(in_features: int, out_features: int, nblocks: int) -> tuple[int, int, int]:
    """(p, q, s): padded input block size, inner size per block, padded output block size."""
    p, s = math.ceil(in_features / nblocks), math.ceil(out_features / nblocks)
    return p, min(p, s), s


def monarch_macs(in_features: int, out_features: int, nblocks: int) -> int:
    p, q, s = monarch_sizes(in_features, out_features, nblocks)
    return nblocks * q * (p + s)


def monarch_nblocks(in_features: int, out_features: int, budget: float) -> int:
    """The fewest blocks whose cost is within ``budget * in * out`` MACs.

    The cost counts the zero padding (p = ceil(in / b), s = ceil(out / b)), so a block count that
    pads a lot buys padding rather than structure: 51 blocks on a 64x64 layer pad it to 102 and
    spend 37% of their MACs on zeros. Fewer blocks mean larger blocks (more parameters, a better
    projection) for the unpadded cost min(in, out) (in + out) / b, so the smallest feasible b wastes
    the least of the budget (22 blocks of 3 on that layer, 3% padding).
    """
    limit = budget * in_features * out_features
    costs = {b: monarch_macs(in_features, out_features, b) for b in range(1, min(in_features, out_features) + 1)}
    feasible = [b for b, cost in costs.items() if cost <= limit]
    if not feasible:
        cheapest = min(costs, key=costs.get)
        raise ValueError(f"budget {budget} is below the cheapest Monarch layout of a {out_features}x{in_features} "
                         f"layer: {costs[cheapest] / (in_features * out_features):.4g} of dense at nblocks={cheapest}")
    return min(feasible)


def _shuffle_indices(nblocks: int, q: int):
    """For every (i, t) of the first factor: output block j, its inner index t', and the rank slot."""
    i = torch.arange(nblocks)[:, None]
    t = torch.arange(q)[None, :]
    m = i * q + t
    return (m % nblocks, (m // nblocks), (t // nblocks).expand(nblocks, q), i.expand(nblocks, q))


def project_to_monarch(weight: torch.Tensor, nblocks: int, gram: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form Frobenius projection of an (out, in) matrix onto Monarch factors (R, L).

    Returns R (b, q, p) and L (b, s, q) in the weight's dtype (SVDs in float64). With ``gram``
    (in, in), each block of W is whitened by the root R_i of G's diagonal block G_ii of its input
    block i (``gram_root``), truncated, and mapped back by R_i^-1: the optimum of the output error
    tr(E G E^T) when G is block-diagonal over the input blocks, since no Monarch block reads two of them.
    """
    out_features, in_features = weight.shape
    p, q, s = monarch_sizes(in_features, out_features, nblocks)
    padded = F.pad(weight.double(), (0, nblocks * p - in_features, 0, nblocks * s - out_features))
    blocks = padded.view(nblocks, s, nblocks, p).transpose(1, 2)  # [j, i] = (s, p) block
    if gram is not None:
        roots, inverses = block_roots(gram.to(weight.device), nblocks, p)
        blocks = blocks @ roots
    u, sv, vh = torch.linalg.svd(blocks, full_matrices=False)
    if gram is not None:
        # Back from the whitened inputs. The pieces' factors are left as the sqrt(S) split gives them,
        # not balanced as low-rank's are: measured on pydoc at budget 0.1 (5 paired seeds), calibrated
        # Monarch fine-tuned to -2.80 perplexity against plain Monarch this way, +2.33 balanced.
        vh = vh @ inverses
    root = sv.sqrt()
    j, t_out, slot, i = _shuffle_indices(nblocks, q)
    R = root[j, i, slot][..., None] * vh[j, i, slot, :]  # (b, q, p)
    L = torch.zeros(nblocks, s, q, dtype=torch.float64)
    L[j, :, t_out] = u[j, i, :, slot] * root[j, i, slot][..., None]
    return R.to(weight.dtype), L.to(weight.dtype)


@register("monarch")
class MonarchLinear(StructuredLinear):
    """y = Monarch(R, L) x + b; R (b, q, p), L (b, s, q) as in the module docstring."""

    def __init__(self, R: torch.Tensor, L: torch.Tensor, in_features: int, out_features: int, bias):
        super().__init__(in_features, out_features, bias)
        self.R, self.L = nn.Parameter(R), nn.Parameter(L)

    @property
    def nblocks(self) -> int:
        return self.R.shape[0]

    def apply_weight(self, x):
        return self._monarch(x, None)

    def forward(self, x):
        return self._monarch(x, self.bias)

    def _monarch(self, x, bias):
        """x (..., in) -> (..., out), plus ``bias`` if given.

        Features first, tokens last, and no copies: block i of every token is the (p, n) view
        x.view(n, b, p)[:, i].T (a transposed GEMM operand), the fixed shuffle is a view of the
        (b, q, n) middle, and the (b s, n) product is returned as its transpose, an (n, out) view
        (the next layer reads it as it reads a contiguous one). Without autograd the bias is added
        in place rather than into a second (n, out) tensor.
        """
        b, q, p = self.R.shape
        s = self.L.shape[1]
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if b * p != self.in_features:
            x = F.pad(x, (0, b * p - self.in_features))
        n = x.shape[0]
        h = torch.bmm(self.R, x.view(n, b, p).permute(1, 2, 0))  # (b, q, n): middle m = i q + t
        h = h.view(q, b, n).transpose(0, 1)  # (b, q, n): block j reads middle m = t' b + j
        y = torch.bmm(self.L, h).view(b * s, n)[: self.out_features].T
        return add_bias(y, bias).reshape(*lead, self.out_features)

    def macs_per_token(self) -> int:
        return monarch_macs(self.in_features, self.out_features, self.nblocks)

    def build_options(self) -> dict:
        return {"nblocks": self.nblocks}

    @classmethod
    def _nblocks(cls, in_features, out_features, budget, nblocks):
        if nblocks is None:
            return monarch_nblocks(in_features, out_features, budget)
        if isinstance(nblocks, bool) or not isinstance(nblocks, int) or not 1 <= nblocks <= min(in_features, out_features):
            raise ValueError(f"nblocks must be an integer in [1, {min(in_features, out_features)}] for a "
                             f"{out_features}x{in_features} layer, got {nblocks!r}")
        return nblocks

    @classmethod
    def from_dense(cls, weight, bias, budget, nblocks: int | None = None, gram: torch.Tensor | None = None):
        """``nblocks`` overrides the budget's choice (e.g. the paper's 4 blocks for GPT-2). With
        ``gram`` the factors are the block-whitened projection's (``project_to_monarch``) or the
        plain one's, whichever has the lower output error on ``gram``."""
        out_features, in_features = weight.shape
        nblocks = cls._nblocks(in_features, out_features, budget, nblocks)
        R, L = project_to_monarch(weight, nblocks)
        layer = cls(R, L, in_features, out_features, bias)
        if gram is not None:
            aware = cls(*project_to_monarch(weight, nblocks, gram), in_features, out_features, bias)
            if output_error(aware.to_dense(), weight, gram) < output_error(layer.to_dense(), weight, gram):
                layer = aware
        layer.projection_error = relative_error(layer.to_dense(), weight)
        return layer

    @classmethod
    def build(cls, in_features, out_features, budget, bias, nblocks: int | None = None):
        nblocks = cls._nblocks(in_features, out_features, budget, nblocks)
        p, q, s = monarch_sizes(in_features, out_features, nblocks)
        # Each entry of W sums about q / b products; match nn.Linear's Var(W_ij) = 1 / (3 in).
        R = torch.randn(nblocks, q, p) / p**0.5
        L = torch.randn(nblocks, s, q) * (nblocks * p / (3 * in_features * max(q, nblocks))) ** 0.5
        return cls(R, L, in_features, out_features, bias)

