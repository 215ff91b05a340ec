"""Global rank allocation for low-rank layers: where one model-wide MAC budget puts the ranks.

The uniform rule gives every layer the rank its own budget buys, floor(budget in out / (in + out)).
The global rule holds only the model's sum: sum over layers of r_l (in_l + out_l) <= budget * sum of
in_l out_l. Rank i of layer l removes sigma_i^2 of that layer's squared error (Eckart-Young) and
costs in_l + out_l MACs per token; the energies are normalized per layer (sigma_i^2 / sum of that
layer's sigma^2) so that layers of different scales compare. Greedily, the rank with the most
normalized energy per MAC is added while it fits. With a calibration Gram G = R R^T the spectrum is
that of W R, whose sigma_i^2 are the output error each rank removes on the calibration inputs (the
whitened SVD of SVD-LLM, arXiv 2403.07378). docs/calibration.md.
"""
import heapq

import torch

from gblr.layers.whiten import gram_root
from gblr.system.errors import BadInput


def allocate_ranks(spectra: list[torch.Tensor], shapes: list[tuple[int, int]], budget: float) -> list[int]:
    """Each layer's rank under the one budget, greedy on normalized energy per MAC.

    spectra: per layer, its singular values (any order; min(out, in) of them or fewer).
    shapes: per layer, (out, in). budget: the layers' total MACs over their dense total, in (0, 1].
    Every layer keeps rank >= 1 (BadInput when even that exceeds the budget); a rank is never
    above min(out, in). Returns the ranks, with sum r_l (in_l + out_l) <= budget * sum in_l out_l.
    With equal costs this is the best choice of ranks (the largest normalized energies overall).
    """
    costs = [o + i for o, i in shapes]
    limit = budget * sum(o * i for o, i in shapes)
    spent = sum(costs)
    if spent > limit:
        raise BadInput(f"budget {budget} is below rank 1 of every layer ({spent} MACs per token, the budget "
                       f"allows {limit:.0f})")
    energies = [normalized_energy(s)[: min(shape)] for s, shape in zip(spectra, shapes)]
    ranks = [1] * len(shapes)
    heap = [(-float(e[1]) / c, l) for l, (e, c) in enumerate(zip(energies, costs)) if len(e) > 1]
    heapq.heapify(heap)
    while heap:
        _, l = heapq.heappop(heap)
        if spent + costs[l] > limit:  # this layer's next ranks cost the same: none of them fits any more
            continue
        ranks[l] += 1
        spent += costs[l]
        if ranks[l] < len(energies[l]):
            heapq.heappush(heap, (-float(energies[l][ranks[l]]) / costs[l], l))
    return ranks


def normalized_energy(singular_values: torch.Tensor) -> torch.Tensor:
    """sigma_i^2 / sum sigma^2 in descending order (float64); zeros for a zero matrix."""
    energy = torch.sort(singular_values.detach().double().flatten().square(), descending=True).values
    total = energy.sum()
    return energy / total if total > 0 else energy


def spectrum(weight: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values of the (out, in) ``weight``, or of W R with R the root of the (in, in) ``gram``
    (``gblr.layers.whiten.gram_root``): the output error each rank of a whitened SVD removes."""
    w = weight.detach().double()
    if gram is not None:
        w = w @ gram_root(gram.to(w.device))[0]
    return torch.linalg.svdvals(w)


def global_ranks(weights: dict[str, torch.Tensor], budget: float, grams: dict | None = None) -> dict[str, int]:
    """{layer name: rank} for the (out, in) ``weights`` under one budget (``allocate_ranks``),
    whitened by the layers' calibration ``grams`` when given."""
    names = list(weights)
    spectra = [spectrum(weights[n], (grams or {}).get(n)) for n in names]
    ranks = allocate_ranks(spectra, [tuple(weights[n].shape) for n in names], budget)
    return dict(zip(names, ranks))


def check_allocation(kind: str, allocation: str, options) -> None:
    """weight.allocation=global chooses each low-rank layer's rank (``global_ranks``); it is
    refused for the other weight types and alongside an explicit rank."""
    if allocation != "global":
        return
    if kind != "lowrank":
        why = {"gblr": "GBLR spreads its widths by weight.budget_mode",
               "monarch": "per-layer block counts are not implemented",
               "blast": "per-layer block counts and ranks are not implemented",
               "dense": "dense layers have no budget"}.get(kind, "it allocates low-rank ranks")
        raise BadInput(f"weight.allocation must be uniform for weight={kind} ({why}), got 'global'; "
                       f"global is for weight=lowrank")
    if options.get("rank") is not None:
        raise BadInput(f"weight.allocation=global chooses each layer's rank, but weight.options.rank="
                       f"{options.get('rank')} fixes it; set weight.options.rank=null or weight.allocation=uniform")
