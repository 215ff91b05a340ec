"""Replace a model's linear layers by structured ones (arXiv 2310.18882, experiments; docs/method.md).

Targets are patterns over module names: a name matches a pattern equal to it, ending with "." and
the pattern ("mlp.fc1" matches ``blocks.3.mlp.fc1``), or matching it as a shell glob
("blocks.*.mlp.fc1", "*.qkv"). Which layers are linear, which are fused (timm's ``attn.qkv`` is
[q; k; v]) and which are replaced by default is the model's family's word
(``gblr.structure.family``; the paper's choices are the presets in configs/model/).
"""
import logging
import time
from fnmatch import fnmatchcase

import torch
from torch import nn

from gblr.layers import from_dense
from gblr.layers import GBLRLinear, StructuredLinear, to_inference as layer_inference
from gblr.structure.family import family_of, is_linear, linear_weight
from gblr.system.errors import BadInput

log = logging.getLogger("gblr")


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The layers the model's family replaces when no targets are given."""
    return family_of(model).default_targets(model)


class ConcatParts(nn.Module):
    """Stands in for a fused layer after ``split_fused``: x (..., in) -> cat(part(x) for each part).

    The parts are children of the fused layer's parent (``blocks.i.attn.q`` for timm's
    ``blocks.i.attn.qkv``), not of this module, so replacing a part later is seen here and the
    parent's forward runs unchanged.
    """

    def __init__(self, parent: nn.Module, parts: tuple[str, ...]):
        super().__init__()
        object.__setattr__(self, "parent", parent)  # a back-reference, not a child (no parameters here)
        self.parts = parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self.parent, part)(x) for part in self.parts], dim=-1)

    def extra_repr(self) -> str:
        return f"cat({', '.join(self.parts)})"


def fused_targets(model: nn.Module, targets) -> dict[str, tuple[str, ...]]:
    """{fused layer name: its part names} for the fused layers of ``model`` one of whose parts a target matches."""
    return {name: parts for name, parts in family_of(model).fused(model).items()
            if any(matches(part, t) for part in parts for t in targets)}


@torch.no_grad()
def split_fused(model: nn.Module, fused: dict[str, tuple[str, ...]]) -> int:
    """Cut each fused linear layer {name: part names} into its parts, equal row blocks in order, and
    put ``ConcatParts`` in its place: the model's outputs are unchanged. Returns the number split
    (a layer already split is skipped)."""
    count = 0
    for name, parts in fused.items():
        layer = model.get_submodule(name)
        if not is_linear(layer):
            continue
        weight, bias = linear_weight(layer)
        parent_name, _, child = name.rpartition(".")
        parent, rows = model.get_submodule(parent_name), weight.shape[0] // len(parts)
        for i, part in enumerate(parts):
            new = nn.Linear(weight.shape[1], rows, bias=bias is not None, device=weight.device, dtype=weight.dtype)
            new.weight.copy_(weight[i * rows:(i + 1) * rows])
            if bias is not None:
                new.bias.copy_(bias[i * rows:(i + 1) * rows])
            setattr(parent, part.rpartition(".")[2], new)
        setattr(parent, child, ConcatParts(parent, tuple(p.rpartition(".")[2] for p in parts)))
        count += 1
    return count


def matches(name: str, pattern: str) -> bool:
    """Whether module ``name`` matches target ``pattern`` (see the module docstring)."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def resolve_targets(model: nn.Module, targets) -> tuple[str, ...]:
    """targets as a tuple of patterns; None means ``default_targets(model)``."""
    return default_targets(model) if targets is None else (targets,) if isinstance(targets, str) else tuple(targets)


def target_weights(model: nn.Module, targets) -> list[tuple[str, torch.Tensor]]:
    """(name, (out, in) weight) of the layers ``target_layers`` would give, read without changing the
    model: a part of a fused layer reads its rows (``split_fused`` cuts them later)."""
    targets = resolve_targets(model, targets)
    fused, found = fused_targets(model, targets), []
    for name, module in model.named_modules():
        if not is_linear(module):
            continue
        weight = linear_weight(module)[0]
        if name in fused:
            parts = fused[name]
            found += [(part, weight[i * weight.shape[0] // len(parts):(i + 1) * weight.shape[0] // len(parts)])
                      for i, part in enumerate(parts) if any(matches(part, t) for t in targets)]
        elif any(matches(name, t) for t in targets):
            found.append((name, weight))
    return found


def target_layers(model: nn.Module, targets) -> list[tuple[str, nn.Module]]:
    """The linear layers whose names match a target, [(name, layer)] in model order.

    targets: patterns (see the module docstring); None means ``default_targets(model)``. A target
    naming a part of a fused layer (timm's attn.q of attn.qkv) first splits that layer
    (``split_fused``; the model's outputs are unchanged). Raises BadInput naming a target that
    matches no linear layer.
    """
    targets = resolve_targets(model, targets)
    split_fused(model, fused_targets(model, targets))
    linears = [(name, m) for name, m in model.named_modules() if is_linear(m)]
    for pattern in targets:
        if not any(matches(name, pattern) for name, _ in linears):
            names = ", ".join(name for name, _ in linears[:12])
            raise BadInput(f"target {pattern!r} matches no linear layer of {type(model).__name__}; targets are "
                           f"module names, suffixes such as 'mlp.fc1' or globs such as 'blocks.*.mlp.fc1'. "
                           f"Linear layers: {names}{', ...' if len(linears) > 12 else ''}")
    return [(name, m) for name, m in linears if any(matches(name, pattern) for pattern in targets)]


def replace_layers(model: nn.Module, targets, kind: str, budget: float, per_layer: dict[str, dict] | None = None,
                   *, after_each=None, **options) -> list[tuple[str, StructuredLinear]]:
    """Replace every layer of ``target_layers(model, targets)`` by ``from_dense(kind, ...)``.

    budget: each layer's target MACs / its dense MACs; ``options`` go to ``gblr.layers.from_dense``
    (``gblr.layers.from_dense``, plus GBLR's budgeted fit). per_layer: {layer name: options} added
    to ``options`` for that layer alone, e.g. its calibration Gram (``gram``) or the rank a global
    allocation chose (``rank``). The new layer takes (..., in) like the old one and gives (..., out),
    on the old weight's device and dtype. Returns [(name, new layer)] in model order. Raises
    BadInput naming a target that matches no replaceable layer (nothing is replaced then). Logs
    one line per layer (a GBLR fit or SVD of a large layer takes seconds). after_each(done, total), when
    given, is called after each layer: a safe point, where the runner stops on a preemption signal.
    """
    chosen = target_layers(model, targets)
    replaced = []
    for i, (name, old) in enumerate(chosen, start=1):
        weight, bias = linear_weight(old)
        start = time.monotonic()
        layer_options = {**options, **(per_layer or {}).get(name, {})}
        new = from_dense(kind, weight, bias, budget, **layer_options).to(device=weight.device, dtype=weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        replaced.append((name, new))
        log.info(f"converted {i}/{len(chosen)} {name} ({weight.shape[0]}x{weight.shape[1]}) to {kind} "
                 f"in {time.monotonic() - start:.2f} s")
        if after_each is not None:
            after_each(i, len(chosen))
    return replaced


def structured_layers(model: nn.Module) -> list[tuple[str, StructuredLinear]]:
    """Every StructuredLinear of the model with its name, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, StructuredLinear)]


def to_inference(model: nn.Module, mode: str = "auto") -> nn.Module:
    """``model`` with every GBLR layer replaced, in place, by ``gblr.layers.to_inference(layer, mode)``:
    the same outputs from the active intervals only, never building the dense W (``mode``: auto |
    blocks | lowrank | dense). Call it after training (``Budget.finish``); returns ``model``."""
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, GBLRLinear)]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer_inference(layer, mode))
    return model
