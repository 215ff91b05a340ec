"""Gaudi-GBLR weight (Lee & Kim, ICLR 2024, arXiv 2310.18882; docs/method.md).

    W = sum_k (m_out_k * U_k) (m_in_k * V_k)^T,     k = 1..K,

U (K, out, r), V (K, r, in); each component's rows and columns are a cyclic interval of its axis,
given by a Gaudi mask of a normalized width and location. ``widths`` and ``locations`` are (2, K)
parameters (row 0: output axis, row 1: input axis) so an optimizer can give them their own group.
A component of hard widths a (out) and b (in) costs min(r (a + b), a b) MACs per token, 0 if either
is 0. Training runs ``GBLRFunction`` (masks recomputed in backward, their gradient in closed form;
``apply_weight_reference`` is the plain autograd path it equals); ``to_inference`` turns a trained
layer into one that touches only the active intervals.
"""

import torch
from torch import nn
from torch.nn import functional as F

from .base import StructuredLinear, register, relative_error
from .components import check_components, component_macs, monarch_components, svd_components
from .fit import fit_components
from .gaudi import boxcar, gaudi_mask, gaudi_mask_vjp, hard_widths
from .lowrank import lowrank_rank
from .monarch import monarch_nblocks
from .whiten import gram_root, output_error


def materialize_cheaper(inner: int, in_features: int, out_features: int, tokens: int) -> bool:
    """Whether forming W (inner in out MACs) and one GEMM beats two thin GEMMs through ``inner``
    components (tokens inner (in + out)): the paper materializes W; at few tokens it is the costlier."""
    return inner * in_features * out_features + tokens * in_features * out_features \
        < tokens * inner * (in_features + out_features)


def _mask_values(widths, locations, n, sigma):
    """The Gaudi masks' forward values (no graph): the boxcar itself when sigma is None."""
    with torch.no_grad():
        return boxcar(widths, locations, n) if sigma is None else gaudi_mask(widths, locations, n, sigma)


class GBLRFunction(torch.autograd.Function):
    """y = x W^T for the GBLR W of (U, V, widths, locations), with the gradients of the autograd
    path ``GBLRLinear.apply_weight_reference`` (tested), in less memory and time.

    Saved for backward: x, the parameters and, when the forward pass formed it, W (out x in, the
    size of the dense layer's weight); masks (K x n each) and masked factors are recomputed there,
    and the masks' width and location gradients come in closed form (``gaudi_mask_vjp``) instead
    of through their complex spectra. Dead components (both widths 0) get exactly zero gradients
    on the autograd path, so they are skipped; placeholders (one width 0) add nothing to y, so the
    forward pass skips them, but backward keeps them: their width gradient lets them regrow. Each
    pass forms W or runs two thin GEMMs, whichever costs fewer MACs at its token count
    (``materialize_cheaper``). The GEMMs run in ``dtype`` (autocast's, when it is on).
    """

    @staticmethod
    def forward(ctx, x, U, V, widths, locations, sigma, dtype):
        K, n_out, r = U.shape
        n_in = V.shape[2]
        a, b = hard_widths(widths[0], n_out), hard_widths(widths[1], n_in)
        with torch.autocast(x.device.type, enabled=False):
            Um, Vm, _, _ = _masked(U, V, widths, locations, sigma, dtype, (a > 0) & (b > 0))
            xc = x.to(dtype)
            W = None
            if materialize_cheaper(Vm.shape[0], n_in, n_out, x.shape[0]):
                W = Um @ Vm
                y = xc @ W.T
            else:
                y = (xc @ Vm.T) @ Um.T
        ctx.save_for_backward(x, U, V, widths, locations, W)
        ctx.sigma, ctx.dtype = sigma, dtype
        return y

    @staticmethod
    def backward(ctx, g):
        x, U, V, widths, locations, W = ctx.saved_tensors
        sigma, dtype = ctx.sigma, ctx.dtype
        K, n_out, r = U.shape
        n_in = V.shape[2]
        a, b = hard_widths(widths[0], n_out), hard_widths(widths[1], n_in)
        live = (a > 0) | (b > 0)  # dead components: every gradient of theirs is 0
        need_x, need_structure = ctx.needs_input_grad[0], ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        with torch.autocast(x.device.type, enabled=False):
            Um, Vm, m_out, m_in = _masked(U, V, widths, locations, sigma, dtype, live)
            index = None if bool(live.all()) else live.nonzero().flatten()
            g, xc = g.to(dtype), x.to(dtype)
            if materialize_cheaper(Vm.shape[0], n_in, n_out, x.shape[0]):
                dW = g.T @ xc  # (out, in)
                if need_x:
                    # W as saved covers the active components; live placeholders add nothing to it
                    dx = g @ (W if W is not None else Um @ Vm)
                dUm, dVm = dW @ Vm.T, Um.T @ dW  # (out, Kl r), (Kl r, in)
            else:
                z, dz = xc @ Vm.T, g @ Um  # (T, Kl r)
                if need_x:
                    dx = dz @ Vm
                dUm, dVm = g.T @ z, dz.T @ xc
            dUm = dUm.reshape(n_out, -1, r).permute(1, 0, 2)  # (Kl, out, r)
            dVm = dVm.reshape(-1, r, n_in)  # (Kl, r, in)
            dU, dV = (dUm * m_out[:, :, None]).to(U.dtype), (dVm * m_in[:, None, :]).to(V.dtype)
            if index is not None:
                dU, dV = U.new_zeros(U.shape).index_copy_(0, index, dU), V.new_zeros(V.shape).index_copy_(0, index, dV)
            dwidths = dlocations = None
            if need_structure:
                Ul, Vl = (U, V) if index is None else (U[index], V[index])
                # d loss / d mask = sum over the rank of (d loss / d masked factor) * factor
                G_out = (dUm * Ul.to(dtype)).sum(-1)  # (Kl, out)
                G_in = (dVm * Vl.to(dtype)).sum(1)  # (Kl, in)
                w, l = (widths, locations) if index is None else (widths[:, index], locations[:, index])
                gw_out, gl_out = gaudi_mask_vjp(G_out, w[0], l[0], n_out, sigma)
                gw_in, gl_in = gaudi_mask_vjp(G_in, w[1], l[1], n_in, sigma)
                dwidths = torch.stack([gw_out, gw_in]).to(widths.dtype)
                dlocations = torch.stack([gl_out, gl_in]).to(locations.dtype)
                if index is not None:
                    dwidths = widths.new_zeros(widths.shape).index_copy_(1, index, dwidths)
                    dlocations = locations.new_zeros(locations.shape).index_copy_(1, index, dlocations)
        dx = dx.to(x.dtype) if need_x else None
        return dx, dU, dV, dwidths, dlocations, None, None


def _masked(U, V, widths, locations, sigma, dtype, keep):
    """(Um (out, Kk r), Vm (Kk r, in), m_out (Kk, out), m_in (Kk, in)) in ``dtype`` over the
    components where ``keep`` (K,) is true: the masked factors as two GEMM operands."""
    if not bool(keep.all()):
        index = keep.nonzero().flatten()
        U, V, widths, locations = U[index], V[index], widths[:, index], locations[:, index]
    n_out, n_in = U.shape[1], V.shape[2]
    m_out = _mask_values(widths[0], locations[0], n_out, sigma).to(dtype)
    m_in = _mask_values(widths[1], locations[1], n_in, sigma).to(dtype)
    Um = (U.to(dtype) * m_out[:, :, None]).permute(1, 0, 2).reshape(n_out, -1)
    Vm = (V.to(dtype) * m_in[:, None, :]).reshape(-1, n_in)
    return Um, Vm, m_out, m_in


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
        """x (..., in) -> (..., out) through ``gblr_apply``: the masks are recomputed in backward,
        nothing but x is kept for it."""
        lead = x.shape[:-1]
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):  # the function runs its GEMMs in autocast's dtype itself
            dtype = torch.get_autocast_dtype(x.device.type)
        y = GBLRFunction.apply(x.reshape(-1, self.in_features), self.U, self.V, self.widths, self.locations,
                               self.sigma, dtype)
        return y.reshape(*lead, self.out_features)

    def apply_weight_reference(self, x):
        """The plain autograd path (masked factors, kept for backward); ``apply_weight`` equals it."""
        U, V = self.masked_factors()
        K, r = self.num_components, self.rank
        tokens = x.numel() // self.in_features
        if materialize_cheaper(K * r, self.in_features, self.out_features, tokens):
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

    def build_options(self) -> dict:
        return {"K": self.num_components, "rank": self.rank, "sigma": self.sigma}

    def component_states(self) -> dict[str, int]:
        """How many components are active (both widths > 0: they cost MACs), placeholders (one
        width > 0, the other 0: they cost nothing, but the closed form's gradient at width 0 lets
        them regrow) and dead (both widths 0: no gradient reaches them again)."""
        a, b = self.hard_structure()
        active = int(((a > 0) & (b > 0)).sum())
        dead = int(((a == 0) & (b == 0)).sum())
        return {"active": active, "placeholder": self.num_components - active - dead, "dead": dead}

    @torch.no_grad()
    def clamp_(self) -> None:
        """Widths into [0, 1], locations wrapped into [0, 1)."""
        self.widths.clamp_(0, 1)
        self.locations.remainder_(1)

    @classmethod
    def from_dense(cls, weight, bias, budget, K: int | None = None, rank: int = 1, sigma: float | None = None,
                   init: str = "lowrank", rank_ratio: float | None = None, seed: int = 0,
                   gram: torch.Tensor | None = None, fit_steps: int = 200):
        """Components from the SVD of ``weight``: component k holds singular triplets k r .. k r + r - 1
        (with ``gram``, of the whitened SVD: ``svd_components``).

        init="lowrank": the top components at full width, the others at one element of one axis
            and none of the other (cost 0, but their width gradient is non-zero, so they can
            regrow), the output axis for even k and the input axis for odd k, as in the paper's code.
            Their number is the budget's low-rank rank / r, or ``rank_ratio * K`` when given
            (the paper's GPT-2 setting is rank_ratio=0.25).
        init="fit": the paper's budgeted fit, ``fit_steps`` steps (``fit_gblr``; it
            takes no ``rank_ratio``). ``fit_steps`` is ignored by init="lowrank".
        init="monarch": the Monarch projection at the budget's block count, its rank-1 pieces as
            components on their blocks (``monarch_components``; rank 1); the remaining components
            hold the leading singular triplets of what Monarch leaves (W minus its projection), as
            free placeholders (one element of one axis).
        """
        out_features, in_features = weight.shape
        K = check_components(in_features, out_features, K, rank)
        if init == "fit":
            if rank_ratio is not None:
                raise ValueError(f"rank_ratio sets init='lowrank''s full-width components; init='fit' fits the "
                                 f"widths to the budget itself, got rank_ratio={rank_ratio!r}")
            return fit_gblr(weight, bias, budget, K=K, rank=rank, sigma=sigma, seed=seed, gram=gram, steps=fit_steps)
        if init == "monarch":
            return cls._from_monarch(weight, bias, budget, K, rank, sigma, seed, gram)
        if init != "lowrank":
            raise ValueError(f"GBLR init must be 'lowrank', 'fit' or 'monarch', got {init!r}")
        generator = torch.Generator().manual_seed(seed)
        U, V = svd_components(weight, K, rank, None if gram is None else gram_root(gram))
        locations = torch.rand(2, K, generator=generator)
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
        layer.projection_error = relative_error(layer.to_dense(), weight)
        return layer

    @classmethod
    def probe(cls, weight, budget, **options):
        """The conversion at one fit step (init="fit"), after the check that ``budget`` pays for one
        full-width rank-1 component (in + out MACs per token): a GBLR layer below it has no full
        component to start from, and one that learns its structure cannot grow one."""
        out_features, in_features = weight.shape
        if budget * in_features * out_features < in_features + out_features:
            raise ValueError(f"budget {budget} is below one full-width rank-1 component of a {out_features}x"
                             f"{in_features} GBLR layer ({in_features + out_features} MACs per token, budget "
                             f">= {(in_features + out_features) / (in_features * out_features):.4g})")
        quick = {**options, "fit_steps": 1} if options.get("init") == "fit" else options
        return cls.from_dense(weight, None, budget, **quick)

    @classmethod
    def without_fit(cls, options):
        """init="fit" becomes its start, init="lowrank" at the budget (the fit never costs more)."""
        if options.get("init") != "fit":
            return options
        return {**{k: v for k, v in options.items() if k not in ("init", "fit_steps")}, "init": "lowrank"}

    @classmethod
    def _from_monarch(cls, weight, bias, budget, K, rank, sigma, seed, gram):
        if rank != 1:
            raise ValueError(f"GBLR init='monarch' writes Monarch's blocks as rank-1 components: rank must be 1, "
                             f"got {rank!r}")
        out_features, in_features = weight.shape
        U, V, widths, locations = monarch_components(weight, monarch_nblocks(in_features, out_features, budget), K, gram)
        spare = K - U.shape[0]
        if spare:
            residual = weight.double() - torch.einsum("kor,kri->oi", U.double(), V.double())
            U_rest, V_rest = svd_components(residual.to(weight.dtype), spare, 1)
            rest = torch.zeros(2, spare)
            rest[0] = 1.0 / out_features  # free placeholders, one output element: the fill can grow them
            U, V = torch.cat([U, U_rest]), torch.cat([V, V_rest])
            widths = torch.cat([widths, rest], 1)
            locations = torch.cat([locations, torch.rand(2, spare, generator=torch.Generator().manual_seed(seed))], 1)
        layer = cls(U, V, widths, locations, bias, sigma)
        layer.projection_error = relative_error(layer.to_dense(), weight)
        return layer

    @classmethod
    def build(cls, in_features, out_features, budget, bias, K: int | None = None, rank: int = 1,
              sigma: float | None = None, width_ratio: float | None = None, seed: int | None = None):
        """Random factors; every component at normalized width ``width_ratio`` on both axes (by
        default the largest equal width within budget, rounded down to whole elements so the
        layer never costs more than the budget), at random locations."""
        K = check_components(in_features, out_features, K, rank)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        sizes = torch.tensor([[out_features], [in_features]], dtype=torch.float64)
        if width_ratio is None:
            width_ratio = min(1.0, budget * in_features * out_features / (K * rank * (in_features + out_features)))
            elements = torch.floor(width_ratio * sizes)
        elif not 0 < width_ratio <= 1:
            raise ValueError(f"width_ratio must be in (0, 1], got {width_ratio!r}")
        else:
            elements = torch.round(width_ratio * sizes)
        # Each W_ij sums about K w^2 r products u v: match nn.Linear's Var(W_ij) = 1 / (3 in).
        scale = (3 * in_features * max(K * rank * width_ratio**2, 1.0)) ** -0.25
        U = torch.randn(K, out_features, rank, generator=generator) * scale
        V = torch.randn(K, rank, in_features, generator=generator) * scale
        widths = (elements / sizes).float().expand(2, K).clone()
        layer = cls(U, V, widths, torch.rand(2, K, generator=generator), bias, sigma)
        if layer.macs_per_token() > budget * in_features * out_features:
            raise ValueError(f"width_ratio={width_ratio} costs {layer.macs_per_token()} MACs per token, more than "
                             f"budget={budget} of {in_features * out_features}; lower width_ratio or raise the budget")
        return layer


def fit_gblr(weight: torch.Tensor, bias: torch.Tensor | None, budget: float, *, K: int | None = None, rank: int = 1,
             sigma: float | None = None, gram: torch.Tensor | None = None, svd_fallback: bool = True,
             return_losses: bool = False, **options) -> GBLRLinear:
    """A GBLRLinear of ``K`` rank-``rank`` components fitted to the (out, in) ``weight`` within
    ``budget`` of its MACs (``gblr.layers.fit.fit_components``, which takes ``options``: steps, lr,
    init, ...); ``bias`` (out,) or None is copied. svd_fallback: return the truncated SVD (GBLR's
    init="lowrank") instead when it is better, on the output error with ``gram`` (in, in), else on
    the weight's. The layer's ``projection_error`` (and ``output_error`` with ``gram``) are set, and
    ``fit_losses`` per step of the kept run if asked."""
    out_features, in_features = weight.shape
    K = check_components(in_features, out_features, K, rank)
    U, V, widths, locations, losses = fit_components(weight, budget, K=K, rank=rank, gram=gram, **options)
    layer = GBLRLinear(U, V, widths, locations, bias, sigma)
    assert layer.macs_per_token() <= budget * in_features * out_features, (layer.macs_per_token(), budget)
    layer.projection_error = relative_error(layer.to_dense(), weight)
    layer.output_error = None if gram is None else output_error(layer.to_dense(), weight, gram)
    # The truncated SVD is a GBLR point too (init="lowrank": the top components at full width): on a
    # weight without block structure it can beat the fit, so the fit never returns anything worse.
    if svd_fallback:
        svd = GBLRLinear.from_dense(weight, bias, budget, K=K, rank=rank, sigma=sigma, init="lowrank", gram=gram)
        if gram is None and svd.projection_error < layer.projection_error:
            layer = svd
        elif gram is not None and output_error(svd.to_dense(), weight, gram) < layer.output_error:
            layer = svd
            layer.output_error = output_error(svd.to_dense(), weight, gram)
    if return_losses:
        layer.fit_losses = losses
    return layer
