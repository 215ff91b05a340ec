"""The budgeted fit of a GBLR layer to a dense weight: the paper's ViT initialization
(arXiv 2310.18882, its initialization for fine-tuning; docs/method.md).

It lives above ``gblr.layers`` because it needs the budget projection (``gblr.budget``).
``from_dense`` is ``gblr.layers.from_dense`` with one more choice for GBLR, ``init="fit"``:
components from the SVD at full width and random locations, then ``fit_steps`` optimizer steps on
the relative Frobenius error with the widths projected onto the budget after every step.
"""
import torch

from gblr import layers
from gblr.budget import project_widths
from gblr.layers import GBLRLinear, relative_error


def fit_to_dense(layer: GBLRLinear, weight: torch.Tensor, max_macs: float, steps: int, lr: float,
                 structure_lr: float) -> list[float]:
    """Fit ``layer`` in place to a dense (out, in) ``weight`` within ``max_macs`` MACs per token.

    AdamW with betas (0, 0.999) and no weight decay on ||W_hat - W||_F^2 / ||W||_F^2, factors at
    ``lr`` and widths/locations at ``structure_lr``, both decayed linearly to 1%; after every step
    the widths are projected onto ``max_macs``. Returns the loss per step.
    """
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


def from_dense(kind: str, weight: torch.Tensor, bias: torch.Tensor | None = None, budget: float = 1.0,
               init: str | None = None, fit_steps: int = 1000, fit_lr: float = 5e-3,
               fit_structure_lr: float | None = None, **options):
    """``gblr.layers.from_dense``, plus ``init="fit"`` for GBLR (see the module docstring).

    fit_steps, fit_lr, fit_structure_lr (default 20 / min(in, out)) set the fit; they are ignored
    by the other inits and weight types.
    """
    if init is not None:
        options["init"] = "full" if init == "fit" else init
    layer = layers.from_dense(kind, weight, bias, budget, **options)
    if init == "fit":
        out_features, in_features = weight.shape
        with torch.no_grad():
            fit_to_dense(layer, weight.detach(), budget * in_features * out_features, fit_steps, fit_lr,
                         fit_structure_lr or 20.0 / min(in_features, out_features))
            layer.projection_error = relative_error(layer.to_dense(), weight)
    return layer
