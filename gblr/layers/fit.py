"""Budgeted fit of a Gaudi-GBLR layer to a dense weight (Lee & Kim, ICLR 2024, arXiv 2310.18882: the
paper's initialization of GBLR from a dense weight under a MAC budget; docs/method.md).

    fit_components(weight, budget, K=K, gram=None, **options) -> (U, V, widths, locations, losses)
    (as a layer: ``gblr.layers.fit_gblr``, or
    ``gblr.layers.from_dense("gblr", weight, bias, budget, gram=None, init="fit", fit_steps=N)``)

The layer's MACs per token never exceed ``budget * in * out`` (after every step and at the end).
Loss: ||W_hat - W||_F^2 / ||W||_F^2 with W_hat the GBLR matrix of the current hard (whole-element)
structure; widths and locations learn through the Gaudi mask's straight-through gradient.

What this fit does beyond the plain "full widths at random locations, AdamW, soft-threshold" loop,
each kept because ``scripts/bench_fit.py`` measured it (64x64 teachers that are GBLR matrices within
the budget but not low-rank):

* SVD-greedy start (``init="greedy"``): the SVD components in singular-value order, each on the
  shortest cyclic row and column intervals holding ``support_keep`` of its energy, while they fit
  the budget; the rest are free placeholders (one output element, no input element, cost 0) that can
  regrow. A singular vector of a block matrix lives in its block, so blocks are found at once; for
  a generic weight this is the truncated SVD at the budget's rank, slightly sparser.
* Edge parametrization (``edges=True``): each interval is learned as a start and an end edge rather
  than (location, width). The budget's soft-threshold shrinks an interval around its centre, and
  each edge moves on its own gradient (d/d start = d/d location - d/d width, d/d end = d/d width).
* The budget's own projection (``gblr.layers.projection.project``): zero-cost widths are never shrunk (a width
  whose shrinking saves no MACs has price 0), and a component cut to both widths 0 keeps one output
  element, since with both at 0 it has no gradient and can never regrow.
* Structure step in elements: ``structure_lr`` elements of the smaller axis per step (0.5), not a
  fraction of the axis.
* Gaussian annealing (``anneal_sigma=(sigma0, fraction)``): smooth masks (sigma0 DFT bins) widening
  geometrically to hard masks over the first ``fraction`` of the steps.
* The best feasible iterate is kept (``keep_best``): Adam with beta1 = 0 takes sign-like steps of
  full size even at a near-exact fit.
Optional, measured not to help here: ``warmup`` (budget decaying from the start's cost to the target)
and ``restarts`` (several seeds; the greedy start only differs in placeholder locations).
"""
from __future__ import annotations

import math

import torch

from .components import component_macs, structure_macs, svd_components
from .gaudi import gaudi_mask, hard_widths
from .projection import project
from .whiten import check_gram, gram_root

__all__ = ["fit_components"]

PATIENCE = 100  # see ``fit_gblr``


def _support_interval(energy: torch.Tensor, keep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Shortest cyclic interval holding >= ``keep`` of each row's energy: (start, width) in elements.

    energy: (K, n) non-negative. Bisection on the width (the energy held is monotone in it), each probe
    vectorized over components and starts by cumulative sums over the doubled axis: O(K n log n).
    """
    K, n = energy.shape
    total = energy.sum(-1, keepdim=True).clamp_min(1e-30)
    doubled = torch.cat([energy, energy], -1)
    csum = torch.cat([torch.zeros(K, 1, dtype=energy.dtype, device=energy.device), doubled.cumsum(-1)], -1)
    starts = torch.arange(n, device=energy.device)[None, :]

    def best(width):  # (K,) widths -> (fraction held, start) of the best placement
        held = (csum.gather(1, starts + width[:, None]) - csum[:, :n]) / total
        return held.max(-1)

    lo = torch.zeros(K, dtype=torch.long, device=energy.device)  # holds < keep (or is 0)
    hi = torch.full((K,), n, dtype=torch.long, device=energy.device)  # holds >= keep (full width)
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        fits = best(mid)[0] >= keep
        hi = torch.where(fits, mid, hi)
        lo = torch.where(fits, lo, mid)
    return best(hi)[1], hi


class _Fit:
    """One run of the fit on a normalized target; parameters are plain tensors."""

    def __init__(self, target, K, rank, max_macs, *, init, seed, edges, support_keep, root=None, whiten=None,
                 spare=64):
        self.target, self.root = target, root
        self.out_features, self.in_features = target.shape
        self.K, self.rank, self.max_macs = K, rank, max_macs
        self.sizes = torch.tensor([[self.out_features], [self.in_features]], device=target.device)
        self.edges = edges
        generator = torch.Generator().manual_seed(seed)
        U, V = svd_components(target, K, rank, whiten)
        self.U, self.V = U.to(target.device), V.to(target.device)
        locations = torch.rand(2, K, generator=generator).to(target.device)
        widths = torch.ones(2, K, device=target.device)
        if init in ("support", "greedy"):
            # Each SVD component's intervals: the shortest holding ``support_keep`` of its energy.
            sa, wa = _support_interval(self.U.square().sum(-1), support_keep)
            sb, wb = _support_interval(self.V.square().sum(-2), support_keep)
            locations = torch.stack([sa.float() / self.out_features, sb.float() / self.in_features])
            widths = torch.stack([wa.float() / self.out_features, wb.float() / self.in_features])
            energy = self.U.square().sum((1, 2)) + self.V.square().sum((1, 2))
            empty = energy <= 1e-5 * energy.max()
            widths[0, empty], widths[1, empty] = 1.0 / self.out_features, 0.0  # null space: a free placeholder
            if init == "greedy":
                # In singular-value order, keep the supports while they fit the budget; the rest are
                # free placeholders (one output element, no input element) that can regrow.
                macs, empty_list = component_macs(wa, wb, rank).tolist(), empty.tolist()
                spent = 0
                for k in range(K):
                    if empty_list[k] or spent + macs[k] > max_macs:
                        widths[0, k], widths[1, k] = 1.0 / self.out_features, 0.0
                    else:
                        spent += macs[k]
        elif init != "full":
            raise ValueError(f"init must be 'full' or 'support', got {init!r}")
        self.start = locations.clone()
        self.width = widths.clone()
        self.play = None  # the components the fit moves; the others stay the placeholders they start as
        active = (hard_widths(widths, self.sizes) > 0).all(0)
        if K > max(2 * int(active.sum()), spare):
            waiting = (~active).nonzero().flatten()
            keep = waiting[: max(int(active.sum()), spare - int(active.sum()))]
            self.play = torch.cat([active.nonzero().flatten(), keep]).sort().values
            self.all = (self.U, self.V, self.start, self.width)
            self.U, self.V = self.U[self.play], self.V[self.play]
            self.start, self.width = self.start[:, self.play], self.width[:, self.play]

    # (start, width) <-> optimizer parameters
    def params(self):
        if self.edges:
            self.p0 = self.start.clone().requires_grad_()
            self.p1 = (self.start + self.width).requires_grad_()
        else:
            self.p0 = self.start.clone().requires_grad_()
            self.p1 = self.width.clone().requires_grad_()
        self.U.requires_grad_()
        self.V.requires_grad_()
        return [self.U, self.V], [self.p0, self.p1]

    @torch.no_grad()
    def start_loss(self, scale) -> float:
        """The loss at the start (before any projection)."""
        self.params()
        return float(self.loss(self.dense(), scale))

    def structure(self):
        if self.edges:
            return self.p0, self.p1 - self.p0
        return self.p0, self.p1

    def dense(self, sigma=None):
        loc, wid = self.structure()
        m_out = gaudi_mask(wid[0], loc[0], self.out_features, sigma)
        m_in = gaudi_mask(wid[1], loc[1], self.in_features, sigma)
        return torch.einsum("kor,kri->oi", self.U * m_out[:, :, None], self.V * m_in[:, None, :])

    def loss(self, approx, scale):
        """||(W_hat - W) R||_F^2 / ``scale``: the output loss on the Gram root R (R = I without one)."""
        error = approx - self.target
        return (error if self.root is None else error @ self.root).square().sum() / scale

    @torch.no_grad()
    def project(self, max_macs):
        loc, wid = self.structure()
        wid = wid.detach().clamp(0, 1)
        new = project(wid, self.sizes.expand(2, wid.shape[1]), self.rank, max_macs)[0].float()
        if self.edges:
            # Shrink around the centre: both edges move in by half the cut.
            start = torch.remainder(self.p0 + 0.5 * (wid - new), 1.0)
            self.p0.copy_(start)
            self.p1.copy_(start + new)
            for _ in range(8):  # end - start can round above ``new``: nudge such ends down
                over = hard_widths(self.p1 - self.p0, self.sizes) > hard_widths(new, self.sizes)
                if not over.any():
                    break
                self.p1.sub_(over * 1e-6)
        else:
            self.p0.remainder_(1.0)
            self.p1.copy_(new)

    def snapshot(self):
        """(U, V, widths, locations) of all K components."""
        loc, wid = self.structure()
        state = (self.U.detach(), self.V.detach(), wid.detach().clamp(0, 1), torch.remainder(loc.detach(), 1.0))
        if self.play is None:
            return tuple(t.clone() for t in state)
        full = [self.all[i].clone() for i in (0, 1, 3, 2)]  # U, V, widths, locations
        for whole, part, axis in zip(full, state, (0, 0, 1, 1)):
            whole.index_copy_(axis, self.play, part.to(whole.dtype))
        return tuple(full)


def _run(target, K, rank, max_macs, *, steps, lr, structure_lr, init, seed, edges, warmup, sigma,
         support_keep, betas, final_lr, keep_best, patience=None, whiten=None):
    root = None if whiten is None else whiten[0].float().to(target.device)
    scale = (target if root is None else target @ root).square().sum().clamp_min(1e-30)
    fits = [_Fit(target, K, rank, max_macs, init=init, seed=seed, edges=edges, support_keep=support_keep,
                 root=root, whiten=w) for w in ([None] if whiten is None else [whiten, None])]
    fit = min(fits, key=lambda f: f.start_loss(scale)) if len(fits) > 1 else fits[0]
    factors, structure = fit.params()
    n_min = min(fit.out_features, fit.in_features)
    factor_scale = float(torch.cat([fit.U.detach().flatten(), fit.V.detach().flatten()]).square().mean().sqrt())
    optimizer = torch.optim.Adam([{"params": factors, "lr": lr * factor_scale},
                                  {"params": structure, "lr": structure_lr / n_min}], betas=betas)
    decay = lambda step: 1.0 - (1.0 - final_lr) * step / max(steps, 1)  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    start_macs = max(float(structure_macs(fit.structure()[1].detach().clamp(0, 1), fit.sizes, rank)), max_macs)
    warm_steps = int(warmup * steps)

    def budget_at(step):
        if step >= warm_steps:
            return max_macs
        return start_macs * (max_macs / start_macs) ** ((step + 1) / warm_steps)

    def sigma_at(step):
        if sigma is None:
            return None
        s0, frac = sigma
        if step >= frac * steps:
            return None
        return s0 * (n_min / 2 / s0) ** (step / (frac * steps))

    fit.project(budget_at(0) if steps else max_macs)
    losses = []
    best, last_gain = (math.inf, None), 0
    if keep_best and budget_at(0) <= max_macs:  # the start itself is a candidate: the fit never ends worse
        with torch.no_grad():
            best = (float(fit.loss(fit.dense(), scale)), fit.snapshot())
    with torch.enable_grad():
        for step in range(steps):
            loss = fit.loss(fit.dense(sigma_at(step)), scale)
            if keep_best and step > warm_steps and sigma_at(step) is None and loss.item() < best[0]:
                if loss.item() < (1 - 1e-3) * best[0]:
                    last_gain = step
                best = (loss.item(), fit.snapshot())  # feasible: projected onto max_macs after the last step
            if patience is not None and sigma_at(step) is None and step - max(last_gain, warm_steps) > patience:
                break  # hard masks, and no step has lowered the best loss by 0.1 % in ``patience`` steps
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            fit.project(budget_at(step))
            losses.append(loss.item())
    fit.project(max_macs)
    with torch.no_grad():
        error = float(fit.loss(fit.dense(), scale).sqrt())
    if best[1] is not None and best[0] ** 0.5 < error:
        return best[0] ** 0.5, best[1], losses
    return error, fit.snapshot(), losses


def fit_components(weight: torch.Tensor, budget: float, *, K: int, rank: int = 1, steps: int = 200,
                   lr: float = 0.02, structure_lr: float = 0.5, init: str = "greedy", edges: bool = True,
                   warmup: float = 0.0, anneal_sigma: tuple[float, float] | None = (2.0, 0.3), restarts: int = 1,
                   support_keep: float = 0.95, keep_best: bool = True, betas=(0.0, 0.999), final_lr: float = 0.01,
                   seed: int = 0, gram: torch.Tensor | None = None, patience: int | None = PATIENCE):
    """``K`` rank-``rank`` GBLR components fitted to ``weight`` within ``budget`` of its MACs:
    (U (K, out, r), V (K, r, in), widths (2, K), locations (2, K), losses per step of the kept run),
    in ``weight``'s dtype and scale. ``gblr.layers.gblr.fit_gblr`` makes them a layer.

    Args:
        weight: (out, in) dense weight. budget: target MACs / (in * out); the result never exceeds it.
        steps: Adam steps per restart; lr: factor step size relative to the RMS of the SVD factors;
        structure_lr: edge/width step in elements of the smaller axis per step (both decay linearly
            to ``final_lr`` of their value).
        init: "greedy" (see the module doc), "support" (every SVD component on its support, then
            the projection; use with ``warmup``) or "full" (every component at full width, random
            locations; the paper's ViT recipe).
        edges, keep_best: see the module doc.
        warmup: fraction of the steps over which the budget decays geometrically from dense to target.
        anneal_sigma: (sigma0, fraction): Gaussian-smoothed masks from sigma0 DFT bins, growing
            geometrically to n/2 over ``fraction`` of the steps, then hard masks.
        restarts: seeds seed .. seed + restarts - 1; the lowest final error is kept.
        gram: (in, in) second moment of the layer's inputs: the loss becomes the output loss
            ||(W_hat - W) R||_F^2 / ||W R||_F^2 (R R^T = gram, ``gram_root``), the start the better of
            the whitened and the plain SVD's.
        patience: once the masks are hard, stop when no step has lowered the best loss by 0.1 % for
            this many steps (None: run every step).
    """
    gram = check_gram(gram, weight.shape[1])
    whiten = None if gram is None else gram_root(gram)
    max_macs = budget * weight.shape[0] * weight.shape[1]
    norm = weight.detach().float().norm().clamp_min(1e-30)
    target = weight.detach().float() / norm
    best = None
    for r in range(max(restarts, 1)):
        result = _run(target, K, rank, max_macs, steps=steps, lr=lr, structure_lr=structure_lr, init=init,
                      seed=seed + r, edges=edges, warmup=warmup,
                      sigma=anneal_sigma, support_keep=support_keep, betas=betas, final_lr=final_lr,
                      keep_best=keep_best, patience=patience, whiten=whiten)
        if best is None or result[0] < best[0]:
            best = result
    _, (U, V, widths, locations), losses = best
    root, dtype, device = norm.sqrt(), weight.dtype, weight.device
    return ((U * root).to(dtype), (V * root).to(dtype), widths.float().to(device), locations.float().to(device),
            losses)
