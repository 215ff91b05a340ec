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

from gblr.layers import GBLRLinear
from gblr.layers.projection import project, width_prices
from gblr.structure_optim import check_structure_optimizer, structure_groups

BUDGET_MODES = ("global", "uniform", "penalty")


def check_mode(mode: str) -> str:
    if mode not in BUDGET_MODES:
        raise ValueError(f"weight.budget_mode must be one of {BUDGET_MODES}, got {mode!r}")
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
    with ``fill``, onto the budget itself): one tau for all of them, so the layers compete for one
    total; returns tau (0 when nothing changed). Widths clamped to [0, 1] and locations wrapped into
    [0, 1) in any case."""
    layers = list(layers)
    if not layers:
        return 0.0
    widths, sizes, ranks = _flat(layers)
    new, tau = project(widths, sizes, ranks, max_macs, fill)
    _write_back(layers, new)
    return tau


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
    ``structure_optimizer`` says (``gblr.structure_optim``: the paper's per-coordinate Adam, or
    ``shared_adam``, whose step keeps the gradients' relative sizes).
    The model is within budget from construction on (conversion options that fix the structure,
    ``rank_ratio``, may start above a global budget), and on it after every step: a model below
    its budget grows back to it (``project``'s ``fill``), except in penalty mode.
    """

    def __init__(self, model: nn.Module, budget: float, mode: str = "global", penalty: float = 0.0,
                 sigma: float | None = None, sigma_schedule: dict | None = None, structure_lr: float = 1e-3,
                 structure_optimizer: str = "shared_adam"):
        self.mode = check_mode(mode)
        self.layers = gblr_layers(model)
        self.budget, self.penalty = budget, penalty
        self.sigma, self.sigma_schedule, self.structure_lr = sigma, sigma_schedule, structure_lr
        self.structure_optimizer = check_structure_optimizer(structure_optimizer)
        self.max_macs = budget * sum(layer.dense_macs_per_token() for layer in self.layers)
        self.enforce(fill=False)  # the conversion's structure is the start, once within budget

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in (layer.widths, layer.locations)]

    def param_groups(self) -> list[dict]:
        """The optimizer groups of the widths and locations (empty without GBLR layers)."""
        named = [(name, p) for layer in self.layers for name, p in (("widths", layer.widths),
                                                                     ("locations", layer.locations))]
        return structure_groups(named, self.structure_lr, self.structure_optimizer) if named else []

    def enforce(self, fill: bool = True) -> None:
        """Bring the layers onto the budget (global or per layer, by the mode); with ``fill`` a
        model below it grows back to it (not in penalty mode, where the penalty decides)."""
        fill = fill and self.mode != "penalty"
        if self.mode == "uniform":
            uniform_project_widths(self.layers, self.budget, fill)
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

    def after_step(self, lr_factor: float) -> None:
        if self.mode == "penalty":
            shrink_widths(self.layers, self.penalty * self.structure_lr * lr_factor)
        else:
            self.enforce()

    def epoch_metrics(self) -> dict:
        return {"replaced_macs_per_token": sum(layer.macs_per_token() for layer in self.layers)} if self.layers else {}

    def finish(self) -> None:
        """Hard masks, and the budget met exactly whatever the mode."""
        for layer in self.layers:
            layer.sigma = None
        self.enforce()
