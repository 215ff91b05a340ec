"""BLAST weight (Lee, Kwon, Qu, Kim, NeurIPS 2024, arXiv 2410.21262): b x b blocks, each a product
through factors shared along its block row and its block column.

Layout for ``b`` blocks, any (out, in): the output is zero-padded to b p (p = ceil(out / b)), the
input to b q (q = ceil(in / b)), and block (i, j) of W, rows i p .. i p + p - 1, columns
j q .. j q + q - 1, is

    W_ij = B_i diag(d_ij) C_j        B: (b, p, r), C: (b, r, q), D: (b, b, r) with D[i, j] = d_ij

B_i is shared by block row i, C_j by block column j; only the coupling d_ij is per block. It holds
the rank-r matrices (b = 1, or every d_ij equal), block-diagonal ones (d_ij = 0 off the diagonal)
and block low-rank ones. The forward never forms W:

    z_j = C_j x_j                 (b r q MACs: in * r, with the padding)
    u_i = sum_j d_ij * z_j        (b^2 r: the coupling)
    y_i = B_i u_i                 (b p r: out * r, with the padding)

Cost: r (b q + b p + b^2) MACs per token, r (in + out + b^2) when b divides both sizes.
From a dense weight: the truncated SVD as the start, then the paper's preconditioned gradient
descent on ||W - W_hat||_F (``fit_blast``).
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import StructuredLinear, add_bias, register, relative_error
from .lowrank import svd_split
from .whiten import block_roots, gram_root, output_error

STEPS = 300  # the official code's number of factorization steps (each updates B, C and D once)
LR = 2.0  # the first step's size; it falls linearly to 0 over the steps
DAMPING = 0.1  # each factor's Gram is damped by DAMPING * ||W - W_hat||_F (W scaled to unit RMS)


def blast_sizes(in_features: int, out_features: int, nblocks: int) -> tuple[int, int]:
    """(p, q): the padded output and input sizes of one block."""
    return math.ceil(out_features / nblocks), math.ceil(in_features / nblocks)


def blast_macs(in_features: int, out_features: int, nblocks: int, rank: int) -> int:
    """MACs per token of a rank-``rank`` BLAST layer of ``nblocks`` x ``nblocks`` blocks, padding included."""
    p, q = blast_sizes(in_features, out_features, nblocks)
    return rank * (nblocks * (p + q) + nblocks * nblocks)


def blast_nblocks(in_features: int, out_features: int, budget: float) -> int:
    """The budget's block count: the largest power of two b whose coupling costs at most a quarter of
    the factors' MACs (4 b^2 <= in + out: 4 for 64 x 64, 8 for 64 x 256, 16 for ViT-B's layers) and
    whose largest rank spends at least 90% of the budget, halved until both hold (1 when none does).

    A block count whose rank rounds down far (64 x 64 at budget 0.1: 4 blocks buy rank 2, 70% of the
    budget) loses more to the lost rank than it gains from the blocks. Measured (docs/method.md,
    "BLAST"; scripts/bench_fit.py --blast-blocks): on the 26 target layers of the two embedded dense
    starts and on a random-init ViT-B 768 x 768 layer, per shape at budgets 0.05-0.5, this b had the
    lowest error in 24 of the 30 cases and was within 2.7% of the best in the others.
    """
    nblocks = 1
    while 4 * (2 * nblocks) ** 2 <= in_features + out_features:
        nblocks *= 2
    limit = budget * in_features * out_features
    while nblocks > 1 and (nblocks > min(in_features, out_features)
                           or blast_rank(in_features, out_features, budget, nblocks)
                           * blast_macs(in_features, out_features, nblocks, 1) < 0.9 * limit):
        nblocks //= 2
    return nblocks


def blast_rank(in_features: int, out_features: int, budget: float, nblocks: int) -> int:
    """Largest rank whose cost (``blast_macs``) is within ``budget * in * out`` MACs (0 if none)."""
    return math.floor(budget * in_features * out_features / blast_macs(in_features, out_features, nblocks, 1))


def blast_dense(B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, out_features: int, in_features: int
                ) -> torch.Tensor:
    """The (out, in) matrix of factors B (b, p, r), C (b, r, q), D (b, b, r), formed block by block."""
    b, p, _ = B.shape
    blocks = torch.einsum("ipr,ijr,jrq->ipjq", B, D, C)
    return blocks.reshape(b * p, b * C.shape[2])[:out_features, :in_features]


def _gauss_newton(X: torch.Tensor, M: torch.Tensor, P: torch.Tensor, eta: float, norm2: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One damped step on one factor X (..., r, k), the others held: the squared error is the quadratic
    norm2 - 2 <X, M> + <X, P X> in X, with M (..., r, k) and Gram P (..., r, r) from the other factors.

    Returns (||W - W_hat||_F at X, X + eta (P + eps I)^-1 (M - P X)), eps = DAMPING * that error; P is
    damped in place. M - P X is minus the gradient; (P + eps I)^-1 preconditions it by the factor's
    damped Gram, so that eta = 1 is the damped least-squares update (the official code's unit step on
    ||.||^2 is eta = 2).
    """
    PX = P @ X
    error = (norm2 - 2 * (X * M).sum() + (X * PX).sum()).clamp_min(0).sqrt()
    # Damped in place (P is a temporary, (b, b, r, r) for D); the floor, sqrt(eps) of the mean
    # eigenvalue, keeps a rank-deficient Gram positive-definite in rounding at zero error. Cholesky,
    # not LU: batched LU on more than one thread hangs for r > ~150 in this torch (pytorch#142815).
    diagonal = P.diagonal(dim1=-2, dim2=-1)
    finfo = torch.finfo(P.dtype)
    diagonal.add_(DAMPING * error + finfo.eps**0.5 * diagonal.mean(-1, keepdim=True).clamp_min(finfo.tiny))
    return error, X + eta * torch.cholesky_solve(M - PX, torch.linalg.cholesky(P))


def _left_terms(rows: torch.Tensor, C: torch.Tensor, D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For B, with rows (b, p, b q) the block rows of W: (M^T (b, r, p), P (b, r, r)) of the quadratic
    in B_i^T: C_bar_i = [diag(d_ij) C_j]_j (r, b q), M_i = W_i C_bar_i^T and P_i = C_bar_i C_bar_i^T."""
    b, r, q = C.shape
    C_bar = (D[..., None] * C).transpose(1, 2).reshape(b, r, b * q)
    return C_bar @ rows.mT, C_bar @ C_bar.mT


def _right_terms(rows: torch.Tensor, B: torch.Tensor, D: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For C: (N (b, r, q), Q (b, r, r)) of the quadratic in C_j, N_j = sum_i diag(d_ij) B_i^T W_ij and
    Q_j = sum_i (B_i^T B_i) * d_ij d_ij^T, with the products the coupling's terms reuse: B_i^T W_ij
    as BW (b, r, b, q) and B_i^T B_i as BB (b, r, r)."""
    b, _, r = B.shape
    BW = (B.mT @ rows).view(b, r, b, -1)
    N = (BW * D.transpose(1, 2)[..., None]).sum(0).transpose(0, 1)
    BB = B.mT @ B
    return N, (BB[:, None] * (D[..., :, None] * D[..., None, :])).sum(0), BW, BB


def fit_blast(W: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, steps: int = STEPS
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BLAST factors of the padded (b p, b q) ``W`` by the paper's preconditioned gradient descent
    from B (b, p, r), C (b, r, q), D (b, b, r); returns the iterate of lowest ||W - W_hat||_F (the
    start included), in W's dtype.

    Each step updates B, then C, then D, each by ``_gauss_newton`` with the other two held: the
    error is a quadratic in each factor alone, and its gradient is preconditioned by that factor's
    damped Gram: the official code's algorithm, at its decomposition script's settings (300 steps,
    damping 0.1 ||W - W_hat||_F; its step 1 on ||.||^2, i.e. 2 here, falling linearly to 0). Two
    GEMMs of the whole W per step (W_i C_bar_i^T, B_i^T W_ij: 2 in * out * r MACs); the errors come
    from the same products, never from W - W_hat itself.
    W is scaled to unit RMS, as the official code does, so that the damping means the same for any
    weight; zero rows of B and columns of C where W is padded stay zero.
    """
    b, p, r = B.shape
    scale = W.square().mean().sqrt().clamp_min(torch.finfo(W.dtype).tiny)
    rows = (W / scale).view(b, p, -1)
    B, C = B / scale.sqrt(), C / scale.sqrt()
    norm2 = rows.square().sum()
    best, best_error = (B, C, D), math.inf
    for t in range(steps + 1):
        eta = LR * (1 - t / max(steps, 1))
        error, Bt = _gauss_newton(B.mT, *_left_terms(rows, C, D), eta, norm2)
        if error < best_error:
            best, best_error = (B, C, D), float(error)
        if t == steps:
            break
        B = Bt.mT
        N, Q, BW, BB = _right_terms(rows, B, D)
        _, C = _gauss_newton(C, N, Q, eta, norm2)
        g = (BW * C.transpose(0, 1)).sum(-1).transpose(1, 2)  # diag(B_i^T W_ij C_j^T)
        H = BB[:, None] * (C @ C.mT)[None]  # (B_i^T B_i) * (C_j C_j^T)
        _, D = _gauss_newton(D[..., None], g[..., None], H, eta, norm2)
        D = D[..., 0]
    B, C, D = best
    return B * scale.sqrt(), C * scale.sqrt(), D


def _svd_start(W: torch.Tensor, nblocks: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The truncated SVD U V of the padded (b p, b q) W as factors: B_i, C_j the row and column blocks
    of U and V (``svd_split``), every d_ij = 1."""
    U, V = svd_split(W, rank)
    B = U.view(nblocks, -1, rank)
    C = V.view(rank, nblocks, -1).transpose(0, 1).contiguous()
    return B, C, torch.ones(nblocks, nblocks, rank, dtype=W.dtype, device=W.device)


def _algebraic_start(W: torch.Tensor, nblocks: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factors that reproduce a padded (b p, b q) W exactly when it is a generic BLAST matrix of this
    structure (b >= 2, r <= p, q), where gradient descent from the SVD start stalls on 19 of 48
    random ones. Block row i spans B_i, block column j spans C_j^T: with U_i, V_j their top-r
    singular vectors each block's core is K_ij = U_i^T W_ij V_j = T_i diag(d_ij) S_j (T_i, S_j r x r).
    Taking d_i0 = d_0j = 1 (the factors' scaling freedom), K_10^-1 K_11 K_01^-1 K_00 is
    S_0^-1 diag(d_11) S_0, whose eigenvectors give S_0^-1 (Jennrich's algorithm for CP
    decompositions); then T_i = K_i0 S_0^-1, S_j = T_0^-1 K_0j and each d_ij by least squares. On
    other matrices it is a worse start than the SVD."""
    b, q = nblocks, W.shape[1] // nblocks
    U = torch.linalg.svd(W.view(b, -1, W.shape[1]), full_matrices=False)[0][..., :rank]  # (b, p, r)
    V = torch.linalg.svd(W.view(-1, b, q).transpose(0, 1), full_matrices=False)[2][:, :rank].mT  # (b, q, r)
    K = U[:, None].mT @ W.view(b, -1, b, q).transpose(1, 2) @ V  # (b, b, r, r)
    pinv = torch.linalg.pinv
    S0_inv = torch.linalg.eig(pinv(K[1, 0]) @ K[1, 1] @ pinv(K[0, 1]) @ K[0, 0])[1].real
    B = U @ K[:, 0] @ S0_inv
    C = pinv(K[0, 0] @ S0_inv) @ K[0] @ V.mT
    g = ((B.mT @ W.view(b, -1, W.shape[1])).view(b, rank, b, q) * C.transpose(0, 1)).sum(-1).transpose(1, 2)
    H = (B.mT @ B)[:, None] * (C @ C.mT)[None]
    return B, C, (pinv(H) @ g[..., None])[..., 0]


def project_to_blast(weight: torch.Tensor, nblocks: int, rank: int, steps: int = STEPS,
                     gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BLAST factors B (b, p, r), C (b, r, q), D (b, b, r) of an (out, in) matrix, in its dtype: from the
    better start of ``_svd_start`` (the truncated SVD at ``rank`` exactly) and ``_algebraic_start`` (exact
    on a BLAST matrix; tried when b >= 2 and r <= p, q), ``steps`` steps of ``fit_blast`` (float32,
    float64 for a float64 weight).

    With ``gram`` (in, in), block column j of W is whitened by the root R_j of G's diagonal block
    G_jj (``block_roots``), fitted, and C_j mapped back by R_j^-1: the optimum of the output error
    tr(E G E^T) when G is block-diagonal over the input blocks, as for Monarch.
    """
    out_features, in_features = weight.shape
    p, q = blast_sizes(in_features, out_features, nblocks)
    work = weight.double() if weight.dtype == torch.float64 else weight.float()
    W = F.pad(work, (0, nblocks * q - in_features, 0, nblocks * p - out_features))
    if gram is not None:
        roots, inverses = (m.to(work) for m in block_roots(gram.to(weight.device), nblocks, q))
        W = (W.view(-1, nblocks, q).transpose(0, 1) @ roots).transpose(0, 1).reshape(W.shape)
    starts = [_svd_start(W, nblocks, rank)]
    if 1 < nblocks and rank <= min(p, q):
        starts.append(_algebraic_start(W, nblocks, rank))
    B, C, D = min(starts, key=lambda start: float((blast_dense(*start, *W.shape) - W).norm().nan_to_num(math.inf)))
    if in_features > out_features:  # the fit's memory-bound work grows with the input size: fit W^T,
        # whose block (j, i) is C_j^T diag(d_ij) B_i^T, and swap the factors back
        Bt, Ct, Dt = fit_blast(W.T.contiguous(), C.mT, B.mT, D.transpose(0, 1), steps)
        B, C, D = Ct.mT, Bt.mT, Dt.transpose(0, 1)
    else:
        B, C, D = fit_blast(W, B, C, D, steps)
    if gram is not None:
        C = C @ inverses
    return tuple(factor.to(weight.dtype).contiguous() for factor in (B, C, D))


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0 (steps of the BLAST factorization), got {steps!r}")
    return steps


@register("blast")
class BlastLinear(StructuredLinear):
    """y = BLAST(B, C, D) x + b; B (b, p, r), C (b, r, q), D (b, b, r) as in the module docstring."""

    def __init__(self, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, in_features: int, out_features: int, bias):
        super().__init__(in_features, out_features, bias)
        self.B, self.C, self.D = nn.Parameter(B), nn.Parameter(C), nn.Parameter(D)

    @property
    def nblocks(self) -> int:
        return self.B.shape[0]

    @property
    def rank(self) -> int:
        return self.B.shape[2]

    def apply_weight(self, x):
        return self._blast(x, None)

    def forward(self, x):
        return self._blast(x, self.bias)

    def _blast(self, x, bias):
        """x (..., in) -> (..., out), plus ``bias`` if given: three batched GEMMs, tokens last.

        Block j of every token is the (q, n) view x.view(n, b, q)[:, j].T; the coupling is one
        (b x b) product per rank index, D[:, :, k] z[:, k]; the (b p, n) result is returned as its
        transpose, an (n, out) view, as Monarch's is.
        """
        b, p, r = self.B.shape
        q = self.C.shape[2]
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if b * q != self.in_features:
            x = F.pad(x, (0, b * q - self.in_features))
        n = x.shape[0]
        z = torch.bmm(self.C, x.view(n, b, q).permute(1, 2, 0))  # (b, r, n): z_j = C_j x_j
        u = torch.bmm(self.D.permute(2, 0, 1), z.transpose(0, 1))  # (r, b, n): u_i = sum_j d_ij * z_j
        y = torch.bmm(self.B, u.transpose(0, 1)).view(b * p, n)[: self.out_features].T
        return add_bias(y, bias).reshape(*lead, self.out_features)

    def macs_per_token(self) -> int:
        return blast_macs(self.in_features, self.out_features, self.nblocks, self.rank)

    def build_options(self) -> dict:
        return {"nblocks": self.nblocks, "rank": self.rank}

    def to_dense(self):
        return blast_dense(self.B, self.C, self.D, self.out_features, self.in_features).detach()

    @staticmethod
    def _structure(in_features, out_features, budget, nblocks, rank) -> tuple[int, int]:
        """(nblocks, rank): the given ones, checked, or the budget's."""
        smaller = min(in_features, out_features)
        for name, value in (("nblocks", nblocks), ("rank", rank)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= smaller):
                raise ValueError(f"{name} must be an integer in [1, {smaller}] for a {out_features}x{in_features} "
                                 f"BLAST layer, got {value!r}")
        if nblocks is None:
            nblocks = blast_nblocks(in_features, out_features, budget)
        if rank is None:
            rank = blast_rank(in_features, out_features, budget, nblocks)
            if rank < 1:
                need = blast_macs(in_features, out_features, nblocks, 1) / (in_features * out_features)
                raise ValueError(f"budget {budget} is below one rank of a {out_features}x{in_features} BLAST layer "
                                 f"of {nblocks}x{nblocks} blocks; it needs at least {need:.4g}")
        return nblocks, rank

    @classmethod
    def from_dense(cls, weight, bias, budget, nblocks: int | None = None, rank: int | None = None,
                   steps: int = STEPS, gram: torch.Tensor | None = None):
        """``project_to_blast`` at ``nblocks`` x ``nblocks`` blocks and ``rank`` (by default the budget's:
        ``blast_nblocks``, ``blast_rank``). With ``gram`` the plain and the block-whitened fits are
        both made and the one of lower output error on ``gram`` kept, as for Monarch.

        When the budget chose the structure (nblocks and rank both None) and ``steps`` > 0, the
        result is never worse than the truncated SVD at its MACs M (``_no_worse_than_svd``), so a
        BLAST conversion never loses to low-rank at the MACs it reports. ``steps=0`` is the SVD start
        at the budget's structure, unfitted (a dry run's MACs: the fit keeps them or falls back to fewer).
        """
        out_features, in_features = weight.shape
        steps = check_steps(steps)
        given = nblocks is not None or rank is not None
        nblocks, rank = cls._structure(in_features, out_features, budget, nblocks, rank)
        layers = [cls(*project_to_blast(weight, nblocks, rank, steps, g), in_features, out_features, bias)
                  for g in ([None] if gram is None else [None, gram])]
        layer = min(layers, key=lambda candidate: output_error(candidate.to_dense(), weight, gram))
        if steps and not given:
            layer = cls._no_worse_than_svd(layer, weight, bias, gram)
        layer.projection_error = relative_error(layer.to_dense(), weight)
        return layer

    @classmethod
    def _no_worse_than_svd(cls, layer, weight, bias, gram):
        """``layer`` if its error (its output error on ``gram``, when given) is at most that of the
        truncated SVD (whitened on ``gram``: ``svd_split``) at rank floor(M / (in + out)), the
        low-rank layer of the same M MACs; otherwise the one-block layer of that SVD at the rank M
        pays for there, floor(M / (in + out + 1)) (one block adds the coupling's r MACs): no worse
        than the SVD at its own MACs, and at most M."""
        out_features, in_features = weight.shape
        macs = layer.macs_per_token()
        U, V = svd_split(weight, macs // (in_features + out_features), None if gram is None else gram_root(gram))
        if output_error(layer.to_dense(), weight, gram) <= output_error(U @ V, weight, gram):
            return layer
        rank = macs // (in_features + out_features + 1)
        ones = torch.ones(1, 1, rank, dtype=weight.dtype, device=weight.device)
        return cls(U[None, :, :rank].contiguous(), V[None, :rank].contiguous(), ones, in_features, out_features, bias)

    @classmethod
    def probe(cls, weight, budget, steps: int = STEPS, **options):
        """The conversion with one step of the fit: the same structure and the same errors."""
        return cls.from_dense(weight, None, budget, steps=min(check_steps(steps), 1), **options)

    @classmethod
    def without_fit(cls, options):
        """steps=0: the SVD start at the budget's structure, whose MACs the fit never exceeds."""
        return {**options, "steps": 0}

    @classmethod
    def build(cls, in_features, out_features, budget, bias, nblocks: int | None = None, rank: int | None = None):
        nblocks, rank = cls._structure(in_features, out_features, budget, nblocks, rank)
        p, q = blast_sizes(in_features, out_features, nblocks)
        # W_ij sums r products B d C: Var = r Var(B) Var(d) Var(C) = 1 / (3 in), nn.Linear's.
        B = torch.randn(nblocks, p, rank) / (3 * rank) ** 0.5
        C = torch.randn(nblocks, rank, q) / in_features**0.5
        D = torch.randn(nblocks, nblocks, rank)
        B.view(-1, rank)[out_features:] = 0  # the padding: output rows no one reads, input columns always 0
        C.masked_fill_((torch.arange(nblocks * q) >= in_features).view(nblocks, 1, q), 0)
        return cls(B, C, D, in_features, out_features, bias)
