"""How the GBLR widths are stepped: the optimizer choice behind ``train.structure_optimizer``.

The widths of all layers compete for one MAC budget: after every step the projection
(``gblr.structure.budget.project_widths``) cuts each width by tau times its MAC price. That is the Euclidean
projection onto the budget, so the pair (step, projection) settles where each width's marginal
loss per MAC is the same -- the allocation that follows the loss -- only if the step keeps the
gradients' relative sizes.

    adam         the paper's: AdamW with betas (0, 0.999) on widths and locations. Each width is
                 divided by its own RMS gradient, so every width moves about +-lr per step whatever
                 its gradient's size: a width of an easy layer with a tiny, steady gradient grows
                 as fast as one of a hard layer, and the MACs do not go where the loss is.
    shared_adam  the widths of all layers share ONE second-moment normalizer (the running mean of
                 the squared width gradients over all of them): the step is lr * m / RMS(g), so
                 the widths keep their gradients' relative sizes and the whole step keeps Adam's
                 scale invariance. The widths take betas (0.9, 0.999): with the per-coordinate
                 normalizer gone, momentum is what averages out the noisy gradients of widths
                 at full width (without it the loss was worse and less stable in
                 scripts/bench_allocation.py). Locations, which do not compete for anything, keep
                 the per-coordinate Adam of ``adam``.

What each choice does on the synthetic allocation task (scripts/bench_allocation.py) and on the
embedded runs: docs/method.md, "How the widths are stepped", and docs/structure.md.
"""
import torch
from torch import nn

from gblr.system.errors import BadInput

STRUCTURE_OPTIMIZERS = ("adam", "shared_adam")


def check_structure_optimizer(name: str) -> str:
    if name not in STRUCTURE_OPTIMIZERS:
        raise BadInput(f"train.structure_optimizer must be one of {STRUCTURE_OPTIMIZERS}, got {name!r}")
    return name


def structure_groups(named: list[tuple[str, torch.Tensor]], lr: float, optimizer: str = "adam",
                     betas: tuple[float, float] = (0.0, 0.999),
                     width_betas: tuple[float, float] = (0.9, 0.999)) -> list[dict]:
    """Parameter groups for ``build_optimizer`` of the GBLR structure parameters ``named`` ((name,
    tensor) pairs, names ending in "widths" or "locations"), at ``lr`` without weight decay.

    "adam": one group in the given order, per-coordinate AdamW with ``betas`` (the paper's).
    "shared_adam": the widths in one group with a shared normalizer (``shared_norm``) and
    ``width_betas``, the locations in another, per-coordinate with ``betas`` as with "adam".
    Every group has ``clip=False``: the training loop's gradient clipping leaves it out (clipped
    together, the structure's gradients would rescale the weights' steps).
    """
    check_structure_optimizer(optimizer)
    common = {"lr": lr, "weight_decay": 0.0, "betas": betas, "clip": False}
    if optimizer == "adam":
        return [{"params": [p for _, p in named], **common}]
    widths = [p for name, p in named if name.rsplit(".", 1)[-1] == "widths"]
    others = [p for name, p in named if name.rsplit(".", 1)[-1] != "widths"]
    return [group for group in ({"params": widths, **common, "betas": width_betas, "shared_norm": True},
                                {"params": others, **common})
            if group["params"]]


def param_groups(model: nn.Module, lr: float, weight_decay: float, apart=()) -> list[dict]:
    """AdamW groups: decayed weights; biases, norms and embeddings without decay. Parameters in
    ``apart`` are left out: their owner adds a group of its own (``gblr.structure.budget.Budget`` does, for
    the GBLR widths and locations: ``training_groups``)."""
    skip = set(getattr(model, "no_weight_decay", lambda: ())())
    apart = {id(p) for p in apart}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in apart:
            continue
        if p.ndim <= 1 or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def training_groups(model: nn.Module, lr: float, weight_decay: float, keeper=None) -> list[dict]:
    """Every trainable parameter's group for ``build_optimizer``: the weights' (``param_groups``) and,
    given a ``gblr.structure.budget.Budget``, its structure's own (widths and locations)."""
    if keeper is None:
        return param_groups(model, lr, weight_decay)
    return param_groups(model, lr, weight_decay, apart=keeper.parameters()) + keeper.param_groups()


def optimizer_for(model: nn.Module, lr: float, weight_decay: float = 0.0, keeper=None,
                  betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW over ``training_groups``: what the runner fine-tunes a structured model with."""
    return build_optimizer(training_groups(model, lr, weight_decay, keeper), betas)


def build_optimizer(groups: list[dict], betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """torch.optim.AdamW, or ``SharedNormAdamW`` when a group asks for a shared normalizer."""
    if any(group.get("shared_norm") for group in groups):
        return SharedNormAdamW(groups, betas=betas)
    return torch.optim.AdamW(groups, betas=betas)


def _unhooked(step):
    """``step`` without the profiling/hook wrapper torch.optim adds to a class's step on first use
    (so that calling the parent's step from ours runs the hooks once, not twice)."""
    return step.__wrapped__ if getattr(step, "hooked", False) else step


class SharedNormAdamW(torch.optim.AdamW):
    """AdamW, except in the groups with ``shared_norm=True``: there ONE second moment serves all
    the group's elements, across all its tensors:

        m_i <- b1 m_i + (1 - b1) g_i               (per element)
        v   <- b2 v   + (1 - b2) mean_j g_j^2      (one number: the mean over the group's elements)
        p_i <- p_i (1 - lr wd) - lr (m_i / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    Other groups are stepped by AdamW itself, so without such a group this is AdamW exactly.
    The shared v is kept in the state of the group's first tensor (``shared_exp_avg_sq``), the step
    count in every tensor's ("step"), the momentum in each tensor's (``shared_exp_avg``).
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        shared = [group for group in self.param_groups if group.get("shared_norm")]
        hidden = [(p, p.grad) for group in shared for p in group["params"] if p.grad is not None]
        for p, _ in hidden:  # AdamW skips tensors without a gradient
            p.grad = None
        try:
            _unhooked(torch.optim.AdamW.step)(self)
        finally:
            for p, grad in hidden:
                p.grad = grad
        for group in shared:
            self._shared_step(group)
        return loss

    def _shared_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
        lead = self.state[group["params"][0]]
        if "shared_exp_avg_sq" not in lead:
            lead["shared_exp_avg_sq"] = torch.zeros((), dtype=torch.float32, device=params[0].device)
            lead["step"] = torch.zeros((), dtype=torch.float32)
        lead["step"] += 1
        t = lead["step"].item()
        grads = [p.grad.float() for p in params]
        mean_sq = sum(g.square().sum() for g in grads) / sum(g.numel() for g in grads)
        v = lead["shared_exp_avg_sq"].mul_(b2).add_((1 - b2) * mean_sq)
        denom = (v / (1 - b2**t)).sqrt() + eps
        for p, g in zip(params, grads):
            state = self.state[p]
            state["step"] = lead["step"].clone()  # every non-empty state has a "step" (AdamW's loader needs it)
            if b1 > 0:
                m = state.setdefault("shared_exp_avg", torch.zeros_like(g)).mul_(b1).add_(g, alpha=1 - b1)
                g = m / (1 - b1**t)
            if wd:
                p.mul_(1 - lr * wd)
            p.sub_((lr * g / denom).to(p.dtype))
