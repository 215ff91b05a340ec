"""MAC accounting of a forward pass, in the three conventions of docs/method.md.

Everything here is in MACs (multiply-accumulates; 1 MAC = 2 FLOPs). Vision papers call MACs
"FLOPs" ("ViT-B 17.6 GFLOPs"), and so does the Gaudi-GBLR paper.

The count is generic: the model runs one example (its family's ``example_input``,
``gblr.structure.family``) under torch's ``FlopCounterMode`` while every structured layer stands
aside (it records the tokens it sees and returns zeros). The counter sees what the rest of the
model executes: its dense linear layers, the attention matmuls (causal masking not exploited), the
convolutions; not norms, activations, softmax, biases or embedding lookups. Each structured layer
then adds its ``macs_per_token()`` x the tokens it saw, never what it executes: a layer that
materializes its masked dense weight costs what its structure costs. A model on the meta device is
counted without computing anything.

Relative cost, three conventions:
- ``replaced``: MACs of the structured layers / their dense MACs (what ``budget`` targets);
- ``model``: the whole forward pass / the same model with every structured layer dense;
- ``paper``: the Gaudi-GBLR paper's numbers where its family defines them (ViT-B/16 at 224 px,
  GPT-2 small: ``paper_macs`` of gblr.tasks.vision / gblr.tasks.language), None otherwise.
"""
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from gblr.layers import StructuredLinear
from gblr.structure.family import family_of, is_linear, linear_weight
from gblr.structure.surgery import structured_layers

UNIT = "MACs (multiply-accumulates; FLOPs = 2 x MACs)"


def cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """torch's formula for fused attention, for the CPU kernel its counter does not list."""
    return sdpa_flop_count(query, key, value)


EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops}


class StandAside(nn.Module):
    """Takes a structured layer's place while the rest is counted: adds the tokens it sees (input
    rows) to ``tokens`` and returns zeros of the layer's output shape."""

    def __init__(self, layer: StructuredLinear):
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not a child: the model's parameters stay as they are
        self.tokens = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tokens += x.numel() // self.layer.in_features
        return x.new_zeros(*x.shape[:-1], self.layer.out_features)


def swap(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put ``modules`` {name: module} in their places; returns what stood there."""
    previous = {}
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        previous[name] = model.get_submodule(name)
        setattr(model.get_submodule(parent), child, module)
    return previous


@torch.no_grad()
def measure(model: nn.Module, example) -> tuple[int, dict[str, StandAside]]:
    """(MACs the model executes on ``example`` without its structured layers, {name: StandAside}
    with the tokens each structured layer saw). The model runs in eval mode and is left as it was."""
    aside = {name: StandAside(layer) for name, layer in structured_layers(model)}
    was_training, previous = model.training, swap(model, aside)
    try:
        model.eval()
        with FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as counter:
            model(example)
    finally:
        swap(model, previous)
        model.train(was_training)
    return counter.get_total_flops() // 2, aside


def count_macs(model: nn.Module, tokens: int | None = None) -> dict:
    """MACs of one example's forward pass (batch 1), counted generically (see the module docstring).

    tokens: the sequence length of a language model (None: its context); vision models take their
    own input size. Returns a dict, all counts in MACs: unit; tokens (the sequence length the
    example has); macs; dense_macs (the same with every structured layer dense, from the shapes);
    replaced_macs and replaced_dense_macs (the structured layers only); relative_replaced (None
    without structured layers), relative_model; and the family's paper conventions (``NO_PAPER``'s
    keys: paper, paper_macs, paper_convention, paper_official).
    """
    family = family_of(model)
    example, seen = family.example_input(model, tokens)
    rest, aside = measure(model, example)
    replaced = sum(a.tokens * a.layer.macs_per_token() for a in aside.values())
    replaced_dense = sum(a.tokens * a.layer.dense_macs_per_token() for a in aside.values())
    return {"unit": UNIT, "tokens": seen, "macs": rest + replaced, "dense_macs": rest + replaced_dense,
            "replaced_macs": replaced, "replaced_dense_macs": replaced_dense,
            "relative_replaced": replaced / replaced_dense if replaced_dense else None,
            "relative_model": (rest + replaced) / (rest + replaced_dense), **family.paper_macs(model)}


def linear_rows(model: nn.Module) -> list[tuple[str, int, int, bool]]:
    """(name, MACs per token, dense MACs per token, structured?) of every linear layer, not
    descending into them: the rows the families' analytic counts are made of."""
    found, inside = [], None
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(module, StructuredLinear):
            found.append((name, module.macs_per_token(), module.dense_macs_per_token(), True))
        elif is_linear(module):
            size = linear_weight(module)[0].numel()
            found.append((name, size, size, False))
        else:
            continue
        inside = name + "."
    return found


def summary(layers, other_macs: int, attention_macs: int, tokens: int) -> dict:
    """An analytic count (the keys of ``count_macs`` but the paper's, plus attention_macs) from rows
    (name, tokens, MACs/token, dense MACs/token, structured?) and the MACs of everything else."""
    linear = sum(t * mpt for _, t, mpt, _, _ in layers)
    linear_dense = sum(t * dense for _, t, _, dense, _ in layers)
    replaced = sum(t * mpt for _, t, mpt, _, structured in layers if structured)
    replaced_dense = sum(t * dense for _, t, _, dense, structured in layers if structured)
    macs, dense_macs = linear + attention_macs + other_macs, linear_dense + attention_macs + other_macs
    return {"unit": UNIT, "tokens": tokens, "macs": macs, "dense_macs": dense_macs, "attention_macs": attention_macs,
            "replaced_macs": replaced, "replaced_dense_macs": replaced_dense,
            "relative_replaced": replaced / replaced_dense if replaced_dense else None,
            "relative_model": macs / dense_macs}


def per_layer_report(model: nn.Module) -> list[dict]:
    """One row per structured layer: name, kind, shape (out, in), macs_per_token,
    dense_macs_per_token, relative (their ratio), projection_error (relative Frobenius, or None)
    and, for layers made of components (GBLR), their counts: active, placeholder, dead."""
    rows = []
    for name, layer in structured_layers(model):
        row = {"name": name, "kind": layer.kind, "shape": (layer.out_features, layer.in_features),
               "macs_per_token": layer.macs_per_token(), "dense_macs_per_token": layer.dense_macs_per_token(),
               "relative": layer.macs_per_token() / layer.dense_macs_per_token(),
               "projection_error": layer.projection_error}
        if hasattr(layer, "component_states"):
            row["components"] = layer.component_states()
        rows.append(row)
    return rows


def mac_report(model: nn.Module, tokens: int | None = None) -> dict:
    """results.json's ``flops`` block (the key keeps the paper's word): counts in MACs (``unit``) and
    the relative costs in the three conventions, the same ratios in MACs as in FLOPs (``replaced`` is
    1.0 for a model without structured layers)."""
    macs = count_macs(model, tokens)
    return {"unit": macs["unit"], "tokens": macs["tokens"], "macs": macs["macs"], "dense_macs": macs["dense_macs"],
            "replaced_macs": macs["replaced_macs"], "replaced_dense_macs": macs["replaced_dense_macs"],
            "replaced": macs["relative_replaced"] if macs["relative_replaced"] is not None else 1.0,
            "model": macs["relative_model"], "paper": macs["paper"],
            "paper_convention": macs["paper_convention"], "paper_official": macs["paper_official"]}
