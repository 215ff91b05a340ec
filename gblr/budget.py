"""The hard FLOP budget of GBLR layers: a FLOP-weighted projection of their widths (SPEC §5).

The paper penalizes the sum of widths with a proximal soft-threshold. Here the budget is a hard
constraint in MACs: after each optimizer step every width is soft-thresholded by tau times its
price (r * n_axis MACs per unit of normalized width) with the smallest tau, found by bisection,
that brings the summed ``macs_per_token()`` of the layers within the budget. Because tau is shared,
the layers compete for one total: the model decides where the MACs go. Widths of components that
already cost 0 MACs (one axis at 0 whole elements, e.g. an inactive component's one-element
placeholder) are left alone: shrinking them saves nothing and would only stop the component from
ever regrowing (with both widths at 0 its widths get no gradient).
"""
import torch

from .layers.gaudi import hard_widths
from .layers.gblr import GBLRLinear, component_macs


def _prices(layers: list[GBLRLinear]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened over all components: widths (2, C) float64, prices (2, C), sizes (2, C), ranks (C,)."""
    widths = torch.cat([layer.widths.detach().double().cpu() for layer in layers], dim=1)
    sizes = torch.cat([torch.tensor([[layer.out_features], [layer.in_features]]).expand(2, layer.num_components)
                       for layer in layers], dim=1)
    ranks = torch.cat([torch.full((layer.num_components,), layer.rank) for layer in layers])
    return widths, (sizes * ranks).double(), sizes, ranks


def free_components(widths: torch.Tensor, sizes, ranks) -> torch.Tensor:
    """(..., K) bool: components that cost 0 MACs at ``widths`` (2, ..., K), whose widths the
    threshold leaves alone. ``widths`` are counted as the parameters hold them (their dtype)."""
    a, b = hard_widths(widths, sizes)
    return component_macs(a, b, ranks) == 0


def soft_threshold_widths(layers: list[GBLRLinear], tau: float) -> None:
    """w <- clamp(w - tau * r * n_axis, 0, 1) for the widths of every component that costs MACs;
    the widths of components that cost 0 only clamped to [0, 1]; locations wrapped into [0, 1)."""
    with torch.no_grad():
        for layer in layers:
            size = torch.tensor([[layer.out_features], [layer.in_features]], dtype=torch.float64,
                                device=layer.widths.device)
            widths = layer.widths.double().clamp(0, 1)
            price = layer.rank * size
            free = free_components(widths.to(layer.widths.dtype), size, layer.rank)
            # In float64, then rounded once to the parameter's dtype: exactly what ``cost`` counted.
            layer.widths.copy_(torch.where(free, widths, (widths - tau * price).clamp(0, 1)))
            layer.locations.remainder_(1)


def project_widths(layers: list[GBLRLinear], max_macs: float, iterations: int = 60) -> float:
    """Soft-threshold the widths of ``layers`` so that their summed MACs per token <= ``max_macs``.

    Widths are first clamped to [0, 1] (locations wrapped); if the layers are within budget nothing
    else changes. Components that cost 0 keep their widths, so they stay at 0 MACs whatever tau: at
    the largest tau every other width is 0 and the total 0, so the bisection always finds a
    feasible tau. Returns the threshold tau used (0 when already within budget). The cost is counted
    exactly as ``macs_per_token`` counts it, on widths rounded to the parameters' dtype.
    """
    layers = list(layers)
    if not layers:
        return 0.0
    soft_threshold_widths(layers, 0.0)
    widths, prices, sizes, ranks = _prices(layers)
    dtype = layers[0].widths.dtype
    free = free_components(widths.to(dtype), sizes, ranks)

    def cost(tau: float) -> int:
        a, b = hard_widths(torch.where(free, widths, (widths - tau * prices).clamp(0, 1)).to(dtype), sizes)
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
