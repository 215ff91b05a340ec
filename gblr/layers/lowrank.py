"""Low-rank weight W = U V^T, initialized by truncated SVD (Eckart-Young optimal)."""
import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import StructuredLinear, register, relative_error
from .whiten import gram_root


def svd_split(weight: torch.Tensor, rank: int, whiten: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of an (m, n) matrix: (U sqrt(S) (m, r), sqrt(S) V^T (r, n)).

    Computed in float64, returned in the weight's dtype; the split of S is balanced so that both
    factors have the same scale. With ``whiten`` = (R, R_inv) of ``gram_root`` the factors are
    those of the whitened SVD, U sqrt(S) and sqrt(S) V^T R_inv from the SVD U S V^T of W R: the best
    rank-r approximation in the output error ||(W - W_hat) R||_F (Eckart-Young on W R).
    """
    w = weight.double() if whiten is None else weight.double() @ whiten[0].to(weight.device)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    U, V = u[:, :rank] * root, root[:, None] * vh[:rank]
    if whiten is not None:
        U, V = balance(U, V @ whiten[1].to(weight.device))
    return U.to(weight.dtype), V.to(weight.dtype)


def balance(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U c, V / c) with c = sqrt(||V_k|| / ||U_k||) per rank-1 term k (U (..., m, r), V (..., r, n)):
    the same product, each term's two factors at the same norm. After whitening the sqrt(S) split
    leaves them far apart (S grows with the calibration tokens, R_inv shrinks V): measured, the
    fine-tune's per-coordinate steps then moved V about 100 times too far relative to its size."""
    c = (V.norm(dim=-1) / U.norm(dim=-2).clamp_min(1e-30)).clamp_min(1e-30).sqrt()
    return U * c.unsqueeze(-2), V / c.unsqueeze(-1)


def lowrank_rank(in_features: int, out_features: int, budget: float) -> int:
    """Largest rank whose cost r (in + out) is within ``budget * in * out`` MACs."""
    return min(math.floor(budget * in_features * out_features / (in_features + out_features)),
               in_features, out_features)


@register("lowrank")
class LowRankLinear(StructuredLinear):
    """y = U (V x) + b with U (out, r) and V (r, in): r (in + out) MACs per token."""

    def __init__(self, U: torch.Tensor, V: torch.Tensor, bias):
        super().__init__(V.shape[1], U.shape[0], bias)
        self.U, self.V = nn.Parameter(U), nn.Parameter(V)

    @property
    def rank(self) -> int:
        return self.V.shape[0]

    def apply_weight(self, x):
        return F.linear(F.linear(x, self.V), self.U)

    def forward(self, x):
        # The bias rides in the second GEMM (addmm), as in nn.Linear: adding it afterwards costs a
        # second (n, out) tensor, about a third of the layer's time at 4096 tokens x 3072 outputs on CPU.
        return F.linear(F.linear(x, self.V), self.U, self.bias)

    def macs_per_token(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def build_options(self) -> dict:
        return {"rank": self.rank}

    def to_dense(self):
        return (self.U @ self.V).detach()

    @staticmethod
    def _rank(in_features, out_features, budget, rank):
        if rank is None:
            rank = lowrank_rank(in_features, out_features, budget)
            if rank < 1:
                raise ValueError(f"budget {budget} is below one rank of a {out_features}x{in_features} low-rank "
                                 f"layer; it needs at least {(in_features + out_features) / (in_features * out_features):.4g}")
        elif not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}] for a {out_features}x{in_features} "
                             f"layer, got {rank!r}")
        return rank

    @classmethod
    def from_dense(cls, weight, bias, budget, rank: int | None = None, gram: torch.Tensor | None = None):
        """``rank`` overrides the budget's rank (e.g. the paper's rank 192 for GPT-2). With ``gram``
        the factors are the whitened SVD's (``svd_split``), optimal for the output error."""
        rank = cls._rank(weight.shape[1], weight.shape[0], budget, rank)
        U, V = svd_split(weight, rank, None if gram is None else gram_root(gram))
        layer = cls(U, V, bias)
        layer.projection_error = relative_error(U @ V, weight)
        return layer

    @classmethod
    def build(cls, in_features, out_features, budget, bias, rank: int | None = None):
        rank = cls._rank(in_features, out_features, budget, rank)
        # Var(U V^T x) matches nn.Linear's init: Var(W_ij) = 1 / (3 in).
        U = torch.randn(out_features, rank) / rank**0.5
        V = torch.randn(rank, in_features) / (3 * in_features) ** 0.5
        return cls(U, V, bias)
