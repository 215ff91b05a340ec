"""The FLOP budget of GBLR layers, in one place: what a width costs, the projection onto a budget,
and the ``Budget`` that holds a model within it while it trains (docs/method.md, "The budget").

The cost of a layer is its ``macs_per_token()``: component k with hard widths a (output) and b
(input) costs min(r (a + b), a b) MACs, 0 if either is 0 (``gblr.layers.gblr.component_macs``;
the rounding rule is ``gblr.layers.gaudi.hard_widths``). The paper holds the cost down with a
proximal soft-threshold on the widths (arXiv 2310.18882, proximal gradient descent). Here the budget is a hard
constraint in MACs: after every optimizer step each width is soft-thresholded by tau times its
price (r * n_axis MACs per unit of normalized width), with the smallest tau, found by bisection,
that brings the summed cost of the layers within the budget. Because tau is shared, the layers
compete for one total: the model decides where the MACs go. Widths of components that cost 0
already (an inactive component's one-element placeholder) are never cut: shrinking them saves no
MACs and would only kill the component (with both widths at 0 no gradient reaches it).
"""
import torch
from torch import nn

from gblr.layers import GBLRLinear, component_macs
from gblr.layers.gaudi import boxcar
from gblr.layers.projection import project, width_prices
from gblr.structure.optimizer import check_structure_optimizer, structure_groups
from gblr.system.errors import BadInput

BUDGET_MODES = ("global", "uniform", "penalty")


def check_mode(mode: str) -> str:
    if mode not in BUDGET_MODES:
        raise BadInput(f"weight.budget_mode must be one of {BUDGET_MODES}, got {mode!r}")
    return mode


def gblr_layers(model: nn.Module) -> list[GBLRLinear]:
    return [m for m in model.modules() if isinstance(m, GBLRLinear)]


def _flat(layers: list[GBLRLinear]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Over all components of ``layers``: widths (2, C), sizes (2, C), ranks (C,)."""
    widths = torch.cat([layer.widths.detach().cpu() for layer in layers], dim=1)
    sizes = torch.cat([torch.tensor([[layer.out_features], [layer.in_features]]).expand(2, layer.num_components)
                       for layer in layers], dim=1)
    ranks = torch.cat([torch.full((layer.num_components,), layer.rank) for layer in layers])
    return widths, sizes, ranks


def _write_back(layers: list[GBLRLinear], widths: torch.Tensor) -> None:
    with torch.no_grad():
        for layer, part in zip(layers, widths.split([layer.num_components for layer in layers], dim=1)):
            layer.widths.copy_(part)  # rounded once to the parameter's dtype: exactly what was counted
            layer.locations.remainder_(1)


def project_widths(layers: list[GBLRLinear], max_macs: float, fill: bool = False) -> float:
    """Project the widths of ``layers`` onto {summed MACs per token <= ``max_macs``} (``project``;
    with ``fill``, onto the budget itself, free components taking what the costing widths cannot
    spend, the most useful first: ``component_scores``): one tau for all of them, so the layers
    compete for one total; returns tau (0 when nothing changed). Widths clamped to [0, 1] and
    locations wrapped into [0, 1) in any case."""
    layers = list(layers)
    if not layers:
        return 0.0
    widths, sizes, ranks = _flat(layers)
    # the scores only when free components are activated: not on every step of a model on its budget
    new, tau = project(widths, sizes, ranks, max_macs, fill, scores=(lambda: component_scores(layers)) if fill else None)
    _write_back(layers, new)
    return tau


def component_scores(layers: list[GBLRLinear]) -> torch.Tensor:
    """(C,) over all components: the share of its layer's energy a component holds at full width
    (||U_k||^2 ||V_k||^2 over the layer's sum; for components from the SVD, its squared singular
    value's share), per MAC of a whole component. Free components are activated in this order: a
    unitless value per MAC, so layers of different scales and shapes compare."""
    scores = []
    with torch.no_grad():
        for layer in layers:
            energy = layer.U.detach().double().square().sum((1, 2)) * layer.V.detach().double().square().sum((1, 2))
            cost = min(layer.rank * (layer.in_features + layer.out_features), layer.in_features * layer.out_features)
            scores.append(energy.cpu() / energy.sum().clamp_min(1e-30).cpu() / cost)
    return torch.cat(scores)


def soft_threshold_widths(layers: list[GBLRLinear], tau: float) -> None:
    """w <- clamp(w - tau * price, 0, 1) for every width (``width_prices``: zero-cost ones stay)."""
    layers = list(layers)
    if layers:
        widths, sizes, ranks = _flat(layers)
        w = widths.double().clamp(0, 1)
        _write_back(layers, (w - tau * width_prices(widths, sizes, ranks)).clamp(0, 1))


def uniform_project_widths(layers: list[GBLRLinear], budget: float, fill: bool = False) -> None:
    """The ablation without reallocation: each layer projected onto ``budget`` of its own dense MACs."""
    for layer in layers:
        project_widths([layer], budget * layer.dense_macs_per_token(), fill)


def shrink_widths(layers: list[GBLRLinear], amount: float) -> None:
    """The paper's proximal step on the sum of normalized widths: w <- clamp(w - amount, 0, 1) for
    every width that has a price (``width_prices``); the others, which save no MACs, stay."""
    layers = list(layers)
    if layers:
        widths, sizes, ranks = _flat(layers)
        priced = width_prices(widths, sizes, ranks) > 0
        w = widths.double().clamp(0, 1)
        _write_back(layers, torch.where(priced, (w - amount).clamp(0, 1), w))


class Budget:
    """Holds a model's GBLR layers within ``budget`` of their dense MACs while it trains.

    The runner creates it after surgery; the training loop calls it as a hook (``start_epoch``,
    ``after_step``, ``epoch_metrics``) and the optimizer gets its ``param_groups``.

    mode "global": after every step, one FLOP-weighted projection over all layers (the model
    decides where the MACs go); "uniform": each layer projected onto its own budget (the ablation);
    "penalty": the paper's proximal step on penalty * (sum of normalized widths): every priced width
    shrinks by penalty * lr after each step (the paper's units), with the hard budget applied at
    the end. ``sigma_schedule`` {start, end, hold_epochs} anneals the masks'
    Gaussian per epoch after ``hold_epochs``; ``finish`` makes the masks hard (sigma None).
    Widths and locations train without weight decay at ``structure_lr``, stepped as
    ``structure_optimizer`` says (``gblr.structure.optimizer``: the paper's per-coordinate Adam, or
    ``shared_adam``, whose step keeps the gradients' relative sizes).
    ``learn=False`` (or ``structure_lr`` 0) freezes the structure where the conversion and the
    budget put it: widths and locations get no gradient and no step, nothing projects them again
    (the ablation of the method's learned structure).
    ``anneal`` {start, steps}: the budget starts at ``start`` (of dense MACs, >= budget; the
    conversion is made at it; ``weight.anneal`` sets it as a factor of the budget) and decays geometrically to ``budget`` over ``steps`` optimizer steps,
    so the projection cuts the structure gradually while the weights adapt.
    The model is on its budget from construction on (conversion options that fix the structure,
    ``rank_ratio``, may start above a global budget; free components take what the conversion
    left unspent), and on it after every step: a model below its budget grows back to it
    (``project``'s ``fill``), except in penalty mode. ``moved_share`` reports how much of the
    structure's MACs moved since the start.
    """

    def __init__(self, model: nn.Module, budget: float, mode: str = "global", penalty: float = 0.0,
                 sigma: float | None = None, sigma_schedule: dict | None = None, structure_lr: float = 1e-3,
                 structure_optimizer: str = "shared_adam", learn: bool = True, anneal: dict | None = None):
        self.mode = check_mode(mode)
        named = [(name, m) for name, m in model.named_modules() if isinstance(m, GBLRLinear)]
        self.names, self.layers = [name for name, _ in named], [m for _, m in named]
        self.budget, self.penalty = budget, penalty
        self.sigma, self.sigma_schedule, self.structure_lr = sigma, sigma_schedule, structure_lr
        self.structure_optimizer = check_structure_optimizer(structure_optimizer)
        self.learn = learn and structure_lr > 0
        self.dense_macs = sum(layer.dense_macs_per_token() for layer in self.layers)
        self.anneal = dict(anneal) if anneal else None
        self.steps = 0
        self.current = self.anneal["start"] if self.anneal else budget
        for layer in self.layers:
            layer.widths.requires_grad_(self.learn)
            layer.locations.requires_grad_(self.learn)
        self.enforce()  # the conversion's structure, on the budget
        self.start = [(layer.widths.detach().clone(), layer.locations.detach().clone()) for layer in self.layers]

    @property
    def max_macs(self) -> float:
        return self.current * self.dense_macs

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in (layer.widths, layer.locations)]

    def param_groups(self) -> list[dict]:
        """The optimizer groups of the widths and locations (empty without GBLR layers or when frozen)."""
        named = [(name, p) for layer in self.layers for name, p in (("widths", layer.widths),
                                                                     ("locations", layer.locations))]
        return structure_groups(named, self.structure_lr, self.structure_optimizer) if named and self.learn else []

    def enforce(self, fill: bool = True) -> None:
        """Bring the layers onto the budget (global or per layer, by the mode); with ``fill`` a
        model below it grows back to it (not in penalty mode, where the penalty decides)."""
        fill = fill and self.mode != "penalty"
        if self.mode == "uniform":
            uniform_project_widths(self.layers, self.current, fill)
        else:
            project_widths(self.layers, self.max_macs, fill)

    def start_epoch(self, epoch: int, epochs: int) -> None:
        sigma = self.sigma
        if self.sigma_schedule:
            s = self.sigma_schedule
            hold = s.get("hold_epochs", 0)
            progress = max(0, epoch - hold) / max(1, epochs - 1 - hold)
            sigma = s["start"] + (s["end"] - s["start"]) * min(1.0, progress)
        for layer in self.layers:
            layer.sigma = sigma

    def after_step(self, lr_factor: float, step: int | None = None) -> None:
        """Project after optimizer step ``step`` (counted from 1 over the whole training; by default
        this object's own count, which a resumed run would restart)."""
        if not self.learn:
            return
        self.steps = self.steps + 1 if step is None else step
        if self.anneal:
            progress = min(1.0, self.steps / max(1, self.anneal["steps"]))
            self.current = self.anneal["start"] * (self.budget / self.anneal["start"]) ** progress
        if self.mode == "penalty":
            shrink_widths(self.layers, self.penalty * self.structure_lr * lr_factor)
        else:
            self.enforce()

    def epoch_metrics(self) -> dict:
        if not self.layers:
            return {}
        return {"replaced_macs_per_token": sum(layer.macs_per_token() for layer in self.layers),
                "moved_share": self.moved()[0]}

    def moved(self) -> tuple[float, list[float]]:
        """(total, per layer): the share of the structure's MACs whose (row, column) cells were not
        the component's at the start. A component's MACs count as moved in the proportion of its
        block's cells outside its start block (all of them for a component that was free at the
        start); the shares are weighted by the MACs each component costs now."""
        moved_macs, layer_shares, total = 0.0, [], 0.0
        with torch.no_grad():
            for layer, (widths0, locations0) in zip(self.layers, self.start):
                macs, moved = moved_macs_of(layer, widths0, locations0)
                layer_shares.append(moved / macs if macs else 0.0)
                moved_macs, total = moved_macs + moved, total + macs
        return (moved_macs / total if total else 0.0), layer_shares

    def report(self) -> dict:
        """The ``structure`` block of results.json: whether it learned, the moved share of its MACs
        (total and per layer), the share in components narrower than their layer on an axis
        (``partial_share``: 0 for a low-rank structure) and the components' states summed over the layers."""
        total, shares = self.moved()
        states = [layer.component_states() for layer in self.layers]
        return {"learned": self.learn, "moved_share": total, "partial_share": partial_share(self.layers),
                "moved_share_per_layer": dict(zip(self.names, shares)),
                "components": {key: sum(state[key] for state in states) for key in ("active", "placeholder", "dead")}}

    def finish(self) -> None:
        """Hard masks, and the budget met exactly whatever the mode (a frozen structure stays as it is)."""
        for layer in self.layers:
            layer.sigma = None
        self.current = self.budget
        if self.learn:
            self.enforce()


def moved_macs_of(layer: GBLRLinear, widths0: torch.Tensor, locations0: torch.Tensor) -> tuple[float, float]:
    """(MACs per token now, of which moved): each component's MACs times the share of its block's
    cells (hard intervals, rows x columns) that lie outside its block at ``widths0``/``locations0``."""
    now = [boxcar(layer.widths[axis], layer.locations[axis], n)
           for axis, n in enumerate((layer.out_features, layer.in_features))]
    then = [boxcar(widths0[axis], locations0[axis], n) for axis, n in enumerate((layer.out_features, layer.in_features))]
    area = now[0].sum(-1) * now[1].sum(-1)
    kept = (now[0] * then[0]).sum(-1) * (now[1] * then[1]).sum(-1)
    macs = component_macs(*layer.hard_structure(), layer.rank).double().cpu()
    share = torch.where(area > 0, 1 - kept / area.clamp_min(1), torch.zeros_like(area)).double().cpu()
    return float(macs.sum()), float((macs * share).sum())


def partial_share(layers: list[GBLRLinear]) -> float:
    """The share of the layers' MACs spent in components that do not span their layer on both axes:
    0 when every active component is a whole rank-r term (the structure is low-rank), 1 when none is."""
    spent = partial = 0.0
    with torch.no_grad():
        for layer in layers:
            a, b = layer.hard_structure()
            macs = component_macs(a, b, layer.rank).double()
            spent += float(macs.sum())
            partial += float(macs[(a < layer.out_features) | (b < layer.in_features)].sum())
    return partial / spent if spent else 0.0
