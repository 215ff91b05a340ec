"""The FLOP budget of GBLR layers, in one place: what a width costs, the projection onto a budget,
and the ``Budget`` that holds a model within it while it trains (docs/method.md, "The budget").

The cost of a layer is its ``macs_per_token()``: component k with hard widths a (output) and b
(input) costs min(r (a + b), a b) MACs, 0 if either is 0 (``gblr.layers.gblr.component_macs``;
the rounding rule is ``gblr.layers.gaudi.hard_widths``). The paper holds the cost down with a
proximal soft-threshold on the widths (arXiv 2310.18882, proximal gradient descent). Here the budget is a hard
constraint in MACs: after every optimizer step each width is soft-thresholded by tau times its
price (r * n_axis MACs per unit of normalized width), with the smallest tau, found by bisection,
that brings the summed cost of the layers within the budget. Because tau is shared, the layers
compete for one total: the model decides where the MACs go.
"""
import torch
from torch import nn

from gblr.layers import GBLRLinear
from gblr.layers.gaudi import hard_widths
from gblr.layers.gblr import component_macs

BUDGET_MODES = ("global", "uniform", "penalty")


def check_mode(mode: str) -> str:
    if mode not in BUDGET_MODES:
        raise ValueError(f"weight.budget_mode must be one of {BUDGET_MODES}, got {mode!r}")
    return mode


def gblr_layers(model: nn.Module) -> list[GBLRLinear]:
    return [m for m in model.modules() if isinstance(m, GBLRLinear)]


def _prices(layers: list[GBLRLinear]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened over all components: widths (2, C) float64, prices (2, C), sizes (2, C), ranks (C,)."""
    widths = torch.cat([layer.widths.detach().double().cpu() for layer in layers], dim=1)
    sizes = torch.cat([torch.tensor([[layer.out_features], [layer.in_features]]).expand(2, layer.num_components)
                       for layer in layers], dim=1)
    ranks = torch.cat([torch.full((layer.num_components,), layer.rank) for layer in layers])
    return widths, (sizes * ranks).double(), sizes, ranks


def soft_threshold_widths(layers: list[GBLRLinear], tau: float) -> None:
    """w <- clamp(w - tau * r * n_axis, 0, 1) for every width; locations wrapped into [0, 1)."""
    with torch.no_grad():
        for layer in layers:
            price = layer.rank * torch.tensor([[layer.out_features], [layer.in_features]], dtype=torch.float64,
                                              device=layer.widths.device)
            # In float64, then rounded once to the parameter's dtype: exactly what ``cost`` counted.
            layer.widths.copy_((layer.widths.double() - tau * price).clamp(0, 1))
            layer.locations.remainder_(1)


def project_widths(layers: list[GBLRLinear], max_macs: float, iterations: int = 60) -> float:
    """Soft-threshold the widths of ``layers`` so that their summed MACs per token <= ``max_macs``.

    Widths are first clamped to [0, 1] (locations wrapped); if the layers are within budget nothing
    else changes. Returns the threshold tau used (0 when already within budget). The cost is counted
    exactly as ``macs_per_token`` counts it, on widths rounded to the parameters' dtype.
    """
    layers = list(layers)
    if not layers:
        return 0.0
    soft_threshold_widths(layers, 0.0)
    widths, prices, sizes, ranks = _prices(layers)
    dtype = layers[0].widths.dtype

    def cost(tau: float) -> int:
        a, b = hard_widths((widths - tau * prices).clamp(0, 1).to(dtype), sizes)
        return int(component_macs(a, b, ranks).sum())

    if cost(0.0) <= max_macs:
        return 0.0
    lo, hi = 0.0, float((widths / prices).max()) * 1.001 + 1e-12
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if cost(mid) <= max_macs else (mid, hi)
    soft_threshold_widths(layers, hi)
    return hi


def uniform_project_widths(layers: list[GBLRLinear], budget: float) -> None:
    """The ablation without reallocation: each layer projected onto ``budget`` of its own dense MACs."""
    for layer in layers:
        project_widths([layer], budget * layer.dense_macs_per_token())


class Budget:
    """Holds a model's GBLR layers within ``budget`` of their dense MACs while it trains.

    The runner creates it after surgery; the training loop calls it as a hook (``start_epoch``,
    ``after_step``, ``epoch_metrics``) and the optimizer gets its ``param_group``.

    mode "global": after every step, one FLOP-weighted projection over all layers (the model
    decides where the MACs go); "uniform": each layer projected onto its own budget (the ablation);
    "penalty": the paper's proximal step on penalty * (sum of widths), tau = penalty * lr, with the
    hard budget applied at the end. ``sigma_schedule`` {start, end, hold_epochs} anneals the masks'
    Gaussian per epoch after ``hold_epochs``; ``finish`` makes the masks hard (sigma None).
    Widths and locations train with AdamW betas (0, 0.999), no weight decay, at ``structure_lr``.
    The model is within budget from construction on: conversion options that fix the structure
    (``rank_ratio``) may start above a global budget.
    """

    def __init__(self, model: nn.Module, budget: float, mode: str = "global", penalty: float = 0.0,
                 sigma: float | None = None, sigma_schedule: dict | None = None, structure_lr: float = 1e-3):
        self.mode = check_mode(mode)
        self.layers = gblr_layers(model)
        self.budget, self.penalty = budget, penalty
        self.sigma, self.sigma_schedule, self.structure_lr = sigma, sigma_schedule, structure_lr
        self.max_macs = budget * sum(layer.dense_macs_per_token() for layer in self.layers)
        self.enforce()

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in (layer.widths, layer.locations)]

    def param_group(self) -> dict:
        return {"params": self.parameters(), "lr": self.structure_lr, "weight_decay": 0.0, "betas": (0.0, 0.999)}

    def enforce(self) -> None:
        """Bring the layers within budget (global or per layer, by the mode)."""
        if self.mode == "uniform":
            uniform_project_widths(self.layers, self.budget)
        else:
            project_widths(self.layers, self.max_macs)

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
            soft_threshold_widths(self.layers, self.penalty * self.structure_lr * lr_factor)
        else:
            self.enforce()

    def epoch_metrics(self) -> dict:
        return {"replaced_macs_per_token": sum(layer.macs_per_token() for layer in self.layers)} if self.layers else {}

    def finish(self) -> None:
        """Hard masks, and the budget met exactly whatever the mode."""
        for layer in self.layers:
            layer.sigma = None
        self.enforce()
