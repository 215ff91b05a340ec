"""Gaudi-GBLR weight (Lee & Kim, ICLR 2024, Eq. 4; SPEC §3).

    W = sum_k (m_out_k * U_k) (m_in_k * V_k)^T,     k = 1..K,

U (K, out, r), V (K, r, in); each component's rows and columns are a cyclic interval of its axis,
given by a Gaudi mask of a normalized width and location. ``widths`` and ``locations`` are (2, K)
parameters (row 0: output axis, row 1: input axis) so an optimizer can give them their own group.
A component of hard widths a (out) and b (in) costs min(r (a + b), a b) MACs per token, 0 if either
is 0. Training applies the masked factors (``apply_weight``); ``to_inference`` turns a trained layer
into one that touches only the active intervals.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import StructuredLinear, register, relative_error
from .gaudi import gaudi_mask, hard_widths
from .lowrank import lowrank_rank


def component_macs(a: torch.Tensor, b: torch.Tensor, rank) -> torch.Tensor:
    """MACs per token of components of hard widths a (output) and b (input): min(r (a + b), a b),
    which is 0 when either width is 0 (SPEC §3)."""
    return torch.minimum(rank * (a + b), a * b)


@register("gblr")
class GBLRLinear(StructuredLinear):
    """y = W x + b with W the GBLR matrix above; ``sigma`` (DFT bins) softens the masks, None = hard."""

    def __init__(self, U: torch.Tensor, V: torch.Tensor, widths: torch.Tensor, locations: torch.Tensor, bias,
                 sigma: float | None = None):
        super().__init__(V.shape[2], U.shape[1], bias)
        self.U, self.V = nn.Parameter(U), nn.Parameter(V)
        self.widths, self.locations = nn.Parameter(widths), nn.Parameter(locations)
        self.sigma = sigma

    @property
    def num_components(self) -> int:
        return self.U.shape[0]

    @property
    def rank(self) -> int:
        return self.U.shape[2]

    def masked_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(m_out * U (K, out, r), m_in * V (K, r, in)) with the current Gaudi masks."""
        m_out = gaudi_mask(self.widths[0], self.locations[0], self.out_features, self.sigma)
        m_in = gaudi_mask(self.widths[1], self.locations[1], self.in_features, self.sigma)
        return self.U * m_out.to(self.U.dtype)[:, :, None], self.V * m_in.to(self.V.dtype)[:, None, :]

    def apply_weight(self, x):
        U, V = self.masked_factors()
        K, r = self.num_components, self.rank
        tokens = x.numel() // self.in_features
        # Materialize W (the paper's way) unless the two thin GEMMs are cheaper at this token count.
        if K * r * self.in_features * self.out_features + tokens * self.in_features * self.out_features \
                < tokens * K * r * (self.in_features + self.out_features):
            return F.linear(x, torch.einsum("kor,kri->oi", U, V))
        return F.linear(F.linear(x, V.reshape(K * r, self.in_features)), U.permute(1, 0, 2).reshape(self.out_features, K * r))

    def to_dense(self):
        with torch.no_grad():
            U, V = self.masked_factors()
            return torch.einsum("kor,kri->oi", U, V)

    def hard_structure(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b): (K,) int64 whole-element widths on the output and input axes."""
        return hard_widths(self.widths[0], self.out_features), hard_widths(self.widths[1], self.in_features)

    def macs_per_token(self) -> int:
        return int(component_macs(*self.hard_structure(), self.rank).sum())

    @torch.no_grad()
    def clamp_(self) -> None:
        """Widths into [0, 1], locations wrapped into [0, 1)."""
        self.widths.clamp_(0, 1)
        self.locations.remainder_(1)

    @staticmethod
    def _check(in_features, out_features, K, rank):
        K = min(in_features, out_features) // rank if K is None else K
        if not (isinstance(rank, int) and rank >= 1 and isinstance(K, int) and K >= 1) \
                or K * rank > min(in_features, out_features):
            raise ValueError(f"GBLR needs K >= 1 components of rank >= 1 with K * rank <= "
                             f"{min(in_features, out_features)} for a {out_features}x{in_features} layer, "
                             f"got K={K!r}, rank={rank!r}")
        return K

    @classmethod
    def from_dense(cls, weight, bias, budget, K: int | None = None, rank: int = 1, sigma: float | None = None,
                   init: str = "lowrank", rank_ratio: float | None = None, fit_steps: int = 1000,
                   fit_lr: float = 5e-3, fit_structure_lr: float | None = None, seed: int = 0):
        """Components from the SVD of ``weight``: component k holds singular triplets k r .. k r + r - 1.

        init="lowrank": the top components at full width, the others at one element of one axis
            and none of the other (cost 0, but their width gradient is non-zero, so they can
            regrow), the output axis for even k and the input axis for odd k, as in the paper's code.
            Their number is the budget's low-rank rank / r, or ``rank_ratio * K`` when given
            (the paper's GPT-2 setting is rank_ratio=0.25).
        init="fit": the paper's ViT recipe (SPEC §4): full widths at random locations, then
            ``fit_steps`` AdamW steps on ||W_hat - W||^2 / ||W||^2, widths projected onto the
            budget after every step.
        """
        out_features, in_features = weight.shape
        K = cls._check(in_features, out_features, K, rank)
        if init not in ("lowrank", "fit"):
            raise ValueError(f"GBLR init must be 'lowrank' or 'fit', got {init!r}")
        generator = torch.Generator().manual_seed(seed)
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        root = s[: K * rank].sqrt()
        U = (u[:, : K * rank] * root).T.reshape(K, rank, out_features).transpose(1, 2).to(weight.dtype)
        V = (root[:, None] * vh[: K * rank]).reshape(K, rank, in_features).to(weight.dtype)
        locations = torch.rand(2, K, generator=generator)
        if init == "lowrank":
            if rank_ratio is None:
                full = min(K, lowrank_rank(in_features, out_features, budget) // rank)
            elif 0 <= rank_ratio <= 1:
                full = round(rank_ratio * K)
            else:
                raise ValueError(f"rank_ratio must be in [0, 1] (fraction of the K={K} components at full width), "
                                 f"got {rank_ratio!r}")
            widths = torch.zeros(2, K)
            widths[0, 0::2] = 1.0 / out_features  # inactive placeholders alternate axes: one output
            widths[1, 1::2] = 1.0 / in_features   # element for even k, one input element for odd k
            widths[:, :full] = 1.0
            locations[:, :full] = 0.0
            layer = cls(U, V, widths, locations, bias, sigma)
        else:
            layer = cls(U, V, torch.ones(2, K), locations, bias, sigma)
            fit_to_dense(layer, weight, budget * in_features * out_features, fit_steps, fit_lr,
                         fit_structure_lr or 20.0 / min(in_features, out_features))
        layer.projection_error = relative_error(layer.to_dense(), weight)
        return layer

    @classmethod
    def build(cls, in_features, out_features, budget, bias, K: int | None = None, rank: int = 1,
              sigma: float | None = None, width_ratio: float | None = None, seed: int | None = None):
        """Random factors; every component at normalized width ``width_ratio`` on both axes (by
        default the largest equal width within budget), at random locations."""
        from ..budget import project_widths

        K = cls._check(in_features, out_features, K, rank)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        if width_ratio is None:
            width_ratio = min(1.0, budget * in_features * out_features / (K * rank * (in_features + out_features)))
        elif not 0 < width_ratio <= 1:
            raise ValueError(f"width_ratio must be in (0, 1], got {width_ratio!r}")
        # Each W_ij sums about K w^2 r products u v: match nn.Linear's Var(W_ij) = 1 / (3 in).
        scale = (3 * in_features * max(K * rank * width_ratio**2, 1.0)) ** -0.25
        U = torch.randn(K, out_features, rank, generator=generator) * scale
        V = torch.randn(K, rank, in_features, generator=generator) * scale
        widths = torch.full((2, K), float(width_ratio))
        layer = cls(U, V, widths, torch.rand(2, K, generator=generator), bias, sigma)
        project_widths([layer], budget * in_features * out_features)  # rounding can overshoot by a few MACs
        return layer


def fit_to_dense(layer: GBLRLinear, weight: torch.Tensor, max_macs: float, steps: int, lr: float,
                 structure_lr: float) -> list[float]:
    """The paper's budgeted fit of a GBLR layer to a dense (out, in) weight (SPEC §4).

    AdamW with betas (0, 0.999) and no weight decay on ||W_hat - W||_F^2 / ||W||_F^2, factors at
    ``lr`` and widths/locations at ``structure_lr``, both decayed linearly to 1%; after every step
    the widths are projected onto ``max_macs``. Returns the loss per step.
    """
    from ..budget import project_widths

    target = weight.to(layer.U.dtype)
    scale = target.square().sum().clamp_min(1e-30)
    optimizer = torch.optim.AdamW([{"params": [layer.U, layer.V], "lr": lr},
                                   {"params": [layer.widths, layer.locations], "lr": structure_lr}],
                                  betas=(0.0, 0.999), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - 0.99 * step / max(steps, 1))
    losses = []
    project_widths([layer], max_macs)
    with torch.enable_grad():
        for _ in range(steps):
            U, V = layer.masked_factors()
            loss = (torch.einsum("kor,kri->oi", U, V) - target).square().sum() / scale
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            project_widths([layer], max_macs)
            losses.append(loss.item())
    return losses
