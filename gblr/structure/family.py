"""What the structure code asks of a model's family, and the families gblr.tasks registers.

A family (one per task class: ``gblr.tasks.vision`` for timm models, ``gblr.tasks.language`` for
Hugging Face causal LMs) answers, for a model it ``owns``:

- ``linear_types``: layer classes besides nn.Linear that are linear maps, each with how to read its
  (out, in) weight and bias (Hugging Face's Conv1D stores its weight as (in, out));
- ``fused(model)``: layers that are several layers' rows stacked, {name: part names}, e.g. timm's
  ``blocks.0.attn.qkv`` = [q; k; v]; a target naming a part splits the fused layer (``surgery``);
- ``default_targets(model)``: the layers replaced when the config names none;
- ``example_input(model, tokens)``: one example, for the generic MAC count (``macs``);
- ``paper_macs(model)``: the paper's conventions where they apply (ViT-B/16, GPT-2 small);
- ``architecture(model)`` / ``build_architecture(record)``: what an export records to rebuild it.

A model no registered family owns gets ``Family`` itself: every nn.Linear can be a target, nothing
is fused, and no MAC count, default targets or export is possible.
"""
from typing import Callable

import torch
from torch import nn

from gblr.system.errors import BadInput

NO_PAPER = {"paper": None, "paper_macs": None, "paper_convention": None, "paper_official": None}
# {layer class: module -> ((out, in) weight, bias or None)}: every linear map the structure code replaces.
LINEAR_TYPES: dict[type, Callable] = {nn.Linear: lambda module: (module.weight, module.bias)}


class Family:
    """The generic family, and the interface every registered one overrides (see the module docstring)."""

    library: str = "none"  # the name an export records (model.json's model.library)
    linear_types: dict[type, Callable] = {}

    @classmethod
    def owns(cls, model: nn.Module) -> bool:
        return False

    @classmethod
    def fused(cls, model: nn.Module) -> dict[str, tuple[str, ...]]:
        return {}

    @classmethod
    def default_targets(cls, model: nn.Module) -> tuple[str, ...]:
        raise BadInput(f"no default targets for {type(model).__name__}; pass targets explicitly")

    @classmethod
    def example_input(cls, model: nn.Module, tokens: int | None) -> torch.Tensor:
        raise BadInput(f"cannot count the MACs of a {type(model).__name__}: only models of a known family "
                       f"(timm vision models, Hugging Face causal LMs) have an example input")

    @classmethod
    def paper_macs(cls, model: nn.Module) -> dict:
        """The paper's conventions (``NO_PAPER``'s keys): None where the paper has none."""
        return dict(NO_PAPER)

    @classmethod
    def architecture(cls, model: nn.Module) -> dict:
        raise BadInput(f"cannot export a {type(model).__name__}: only timm and Hugging Face models")

    @classmethod
    def build_architecture(cls, record: dict) -> nn.Module:
        raise BadInput(f"unknown model library {record.get('library')!r} in an export")


FAMILIES: list[type[Family]] = []


def register(family: type[Family]) -> type[Family]:
    """Class decorator: consult ``family`` for the models it owns; its linear types become replaceable."""
    FAMILIES.append(family)
    LINEAR_TYPES.update(family.linear_types)
    return family


def family_of(model: nn.Module) -> type[Family]:
    """The registered family that owns ``model``, else the generic ``Family``."""
    return next((family for family in FAMILIES if family.owns(model)), Family)


def family_named(library: str) -> type[Family]:
    """The registered family whose exports record ``library``, else the generic one (which refuses)."""
    return next((family for family in FAMILIES if family.library == library), Family)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, tuple(LINEAR_TYPES))


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, in) weight and (out,) bias (or None) of a linear map of ``LINEAR_TYPES``."""
    for cls in type(module).__mro__:
        if cls in LINEAR_TYPES:
            return LINEAR_TYPES[cls](module)
    raise TypeError(f"{type(module).__name__} is not a linear layer gblr can read")
