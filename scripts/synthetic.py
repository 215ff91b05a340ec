"""A student-teacher task whose layers differ in how many MACs they need: where does a global
budget put the MACs, and does that lower the loss?

The teacher is a residual MLP ``h <- h + W_l tanh(h)`` of ``len(kinds)`` dense n x n layers. An
"easy" layer's W is nearly of rank 2 (two components suffice, the others hold a faint tail); a
"hard" one has a slowly decaying spectrum s_i ~ (i + 1)^-1/2 over all n directions (every extra
component lowers the loss). Both have the
same Frobenius norm. The student is the teacher with every layer turned into GBLR by the low-rank
start at ``budget`` (the runner's recipe: the same rank in every layer), then fine-tuned on fresh
Gaussian inputs to the teacher's outputs, its widths kept within the budget after every step by
``gblr.structure.budget.Budget`` (global: one total for all layers; uniform: each layer its own). The loss is the
mean squared error over the teacher output's mean square, on a fixed test set.
"""
import math

import torch
from torch import nn

from gblr.layers import GBLRLinear
from gblr.structure.budget import Budget
from gblr.structure.optimizer import build_optimizer, structure_groups
from gblr.run.train import lr_factor
from gblr.structure.optimizer import param_groups

KINDS = ("hard", "easy", "hard", "easy")


def teacher_weight(kind: str, n: int, generator: torch.Generator, tail: float = 0.05) -> torch.Tensor:
    """(n, n) weight of Frobenius norm sqrt(n) and spectrum (i + 1)^-1/2 ("hard"), or two equal
    singular values above that spectrum times ``tail`` ("easy": never exactly low rank, as no
    trained weight is)."""
    if kind not in ("easy", "hard"):
        raise ValueError(f"layer kind must be 'easy' or 'hard', got {kind!r}")
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    s = (torch.arange(n, dtype=torch.float64) + 1) ** -0.5
    if kind == "easy":
        s = tail * s
        s[:2] = 1.0
    s *= math.sqrt(n) / s.norm()
    return ((u * s) @ v.T).float()


class ResidualMLP(nn.Module):
    """h <- h + layer(tanh(h)) for each layer; ``layers`` nn.Linear (teacher) or GBLRLinear (student)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(torch.tanh(x))
        return x


def make_task(kinds=KINDS, n: int = 64, budget: float = 0.2, seed: int = 0, rank_ratio: float | None = None):
    """(teacher, student, test inputs, test targets) for ``kinds`` of layers; ``rank_ratio`` the
    fraction of components at full width in the start (GBLRLinear.from_dense; None: the low-rank
    start of ``budget``)."""
    generator = torch.Generator().manual_seed(seed)
    weights = [teacher_weight(kind, n, generator) for kind in kinds]
    teacher = ResidualMLP([nn.Linear(n, n, bias=False) for _ in kinds]).requires_grad_(False)
    for layer, w in zip(teacher.layers, weights):
        layer.weight.copy_(w)
    student = ResidualMLP([GBLRLinear.from_dense(w, None, budget, init="lowrank", rank_ratio=rank_ratio, seed=seed + k)
                           for k, w in enumerate(weights)])
    x = torch.randn(4096, n, generator=generator)
    return teacher, student, x, teacher(x)


def relative_loss(model, x, y) -> torch.Tensor:
    return (model(x) - y).square().mean() / y.square().mean()


def run(optimizer: str = "shared_adam", mode: str = "global", *, kinds=KINDS, n: int = 64, budget: float = 0.2,
        seed: int = 0, steps: int = 300, batch: int = 128, lr: float = 1e-3, structure_lr: float = 1e-2,
        width_betas: tuple[float, float] | None = None, per_layer: bool = False,
        rank_ratio: float | None = None) -> dict:
    """Fine-tune the student of ``make_task`` and report its test loss and MACs per layer.

    optimizer: a ``train.structure_optimizer`` (adam | shared_adam); with shared_adam,
    ``width_betas`` instead of its default and ``per_layer``: one normalizer per layer, not one for all.
    Factors at ``lr``, widths/locations at ``structure_lr``, both on train's cosine schedule to 1%.
    Returns {"loss", "start_loss", "macs": [per layer], "kinds", "max_macs"}.
    """
    teacher, student, x_test, y_test = make_task(kinds, n, budget, seed, rank_ratio)
    keeper = Budget(student, budget, mode, structure_lr=structure_lr, structure_optimizer=optimizer)
    groups = param_groups(student, lr, 0.0, apart=keeper.parameters())
    if per_layer or width_betas is not None:
        options = {} if width_betas is None else {"width_betas": width_betas}
        for layer in student.layers if per_layer else [student]:
            groups += structure_groups([(k, p) for k, p in layer.named_parameters() if k.endswith(("widths", "locations"))],
                                       structure_lr, optimizer, **options)
    else:
        groups += keeper.param_groups()
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = build_optimizer(groups, betas=(0.9, 0.999))
    generator = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        start = relative_loss(student, x_test, y_test).item()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, steps, 0, 0.01)
        x = torch.randn(batch, n, generator=generator)
        loss = relative_loss(student, x, teacher(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        keeper.after_step(lr_factor(step, steps, 0, 0.01))
    keeper.finish()
    with torch.no_grad():
        final = relative_loss(student, x_test, y_test).item()
    return {"loss": final, "start_loss": start, "macs": [layer.macs_per_token() for layer in student.layers],
            "kinds": list(kinds), "max_macs": keeper.max_macs}


def macs_by_kind(result: dict) -> dict:
    """Summed MACs of the result's layers of each kind."""
    out = {}
    for kind, macs in zip(result["kinds"], result["macs"]):
        out[kind] = out.get(kind, 0) + macs
    return out
