"""The budget's projection of GBLR widths, as pure functions: what a width costs and the smallest
soft-threshold that brings a set of components within a MAC budget (docs/method.md, "The budget").

They sit with the layers because the budgeted fit (``gblr.layers.fit``) projects with them as the
training-time budget (``gblr.structure.budget.Budget``) does: one rule for both.
"""
import torch

from .gaudi import hard_widths
from .components import component_macs, structure_macs


def width_prices(widths: torch.Tensor, sizes: torch.Tensor, ranks) -> torch.Tensor:
    """(2, C) float64 MACs per unit of normalized width: r * n_axis, and 0 for both widths of a
    component that costs 0 already (an axis at 0 whole elements): shrinking those saves nothing and
    would only stop the component from ever regrowing. ``widths`` (2, C) as the parameters hold them."""
    a, b = hard_widths(widths, sizes)
    free = component_macs(a, b, ranks) == 0
    return torch.where(free, 0.0, (sizes * ranks).double())


def project(widths: torch.Tensor, sizes: torch.Tensor, ranks, max_macs: float, fill: bool = False,
            rounds: int = 4, grid: int = 64, scores=None) -> tuple[torch.Tensor, float]:
    """(new widths, tau): widths (2, C) soft-thresholded by tau * ``width_prices`` with the smallest
    tau that brings their cost within ``max_macs`` MACs per token; float64, clamped to [0, 1].

    Over budget, tau > 0 cuts. Within budget, tau = 0 leaves the widths alone, unless ``fill``:
    then tau < 0 grows the costing widths by the same rule until the budget is used (as far as
    whole elements allow), so that noise in the widths' steps, clamped at full width, cannot drift
    the model below its budget. The cost is counted as ``macs_per_token`` counts it, on the widths
    cast to ``widths.dtype``. tau is found on a ``grid`` refined ``rounds`` times (a vectorized
    bisection). Components that cost 0 stay as they are whatever tau, so a cut to every priced
    width at 0 is always feasible; a component that the cut leaves with both widths at 0 keeps one
    output element, at no cost: with both at 0 no gradient reaches it again. With ``fill`` and
    ``scores`` (a function returning (C,) scores, called only when needed), budget that growing
    the costing widths cannot spend (they are all at full width) goes to free components
    (``activate``), so the result is on the budget to within less than one component's cost.
    """
    dtype, sizes = widths.dtype, sizes.to(widths.device)
    w = widths.detach().double().clamp(0, 1)

    def cost(candidates: torch.Tensor) -> torch.Tensor:  # (T, 2, C) widths -> (T,) MACs
        return structure_macs(candidates.to(dtype), sizes, ranks)

    prices = width_prices(w.to(dtype), sizes, ranks)
    priced = prices > 0
    within = int(cost(w[None])[0]) <= max_macs
    if within and not fill:
        return w, 0.0
    if within and scores is not None and not priced.any():
        return activate(w, sizes, ranks, max_macs - float(cost(w[None])[0]), scores(), dtype), 0.0
    if not priced.any():
        return w, 0.0
    if within:  # lo: every priced width at 1 (feasible or not), hi = 0: feasible
        lo, hi = -float(((1 - w[priced]) / prices[priced]).max()) * 1.001 - 1e-12, 0.0
        full = (w - lo * prices).clamp(0, 1)
        if int(cost(full[None])[0]) <= max_macs:
            if scores is not None:
                full = activate(full, sizes, ranks, max_macs - float(cost(full[None])[0]), scores(), dtype)
            return full, lo
    else:  # lo = 0: infeasible, hi: every priced width at 0, feasible
        lo, hi = 0.0, float((w[priced] / prices[priced]).max()) * 1.001 + 1e-12
    for _ in range(rounds):
        taus = torch.linspace(lo, hi, grid + 1, dtype=torch.float64, device=w.device)[1:]
        ok = cost((w - taus[:, None, None] * prices).clamp(0, 1)) <= max_macs
        first = int(ok.long().argmax())  # the cost falls with tau, and hi is feasible
        lo, hi = (float(taus[first - 1]) if first else lo), float(taus[first])
    new = (w - hi * prices).clamp(0, 1)
    a, b = hard_widths(new.to(dtype), sizes)
    dead = (a == 0) & (b == 0) & (prices[0] > 0)
    new[0] = torch.where(dead, 1.0 / sizes[0].double(), new[0])
    return new, hi


def activate(widths: torch.Tensor, sizes: torch.Tensor, ranks, room: float, scores: torch.Tensor,
             dtype=torch.float32) -> torch.Tensor:
    """Spend ``room`` MACs per token on free components (cost 0: one axis at 0 whole elements), in
    descending ``scores`` (C,): each becomes a whole component (both widths 1) while one fits, else
    the part that fits: its shorter axis whole and as much of the other as the room pays for
    (at rank r a block a x b costs r (a + b) once that is below a b). Free components that do not
    fit are skipped, so a smaller layer's may still take what remains; what is left at the end is
    less than the cost of any free component's smallest useful part. Returns new (2, C) widths."""
    w = widths.clone()
    a, b = hard_widths(w.to(dtype), sizes)
    ranks = torch.as_tensor(ranks).expand(w.shape[1])
    free = component_macs(a, b, ranks) == 0
    for k in scores.argsort(descending=True).tolist():
        if room < 1:
            break
        if not free[k]:
            continue
        n_out, n_in, r = int(sizes[0, k]), int(sizes[1, k]), int(ranks[k])
        whole = min(r * (n_out + n_in), n_out * n_in)
        if whole <= room:
            w[:, k], room = 1.0, room - whole
            continue
        short = 0 if n_out <= n_in else 1
        n_short, n_long = (n_out, n_in) if short == 0 else (n_in, n_out)
        part = int(room // r) - n_short  # r (n_short + part) <= room
        if part >= 1:
            w[short, k], w[1 - short, k] = 1.0, part / n_long
            room -= min(r * (n_short + part), n_short * part)
    return w
