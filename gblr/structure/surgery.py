"""Replace a model's linear layers by structured ones (arXiv 2310.18882, experiments; docs/method.md).

Targets are module-name suffixes: "mlp.fc1" matches ``blocks.3.mlp.fc1``. The paper replaces
- in a timm ViT: q, k, v (timm's fused ``attn.qkv`` split into three d x d layers), fc1, fc2;
  attn.proj and the head stay dense;
- in a Hugging Face GPT-2: attn.c_attn, mlp.c_fc, mlp.c_proj; attn.c_proj, the embeddings and the
  LM head stay dense.
"""
import logging
import time

import torch
from torch import nn
from timm.models.vision_transformer import Attention, VisionTransformer
from transformers.pytorch_utils import Conv1D

from gblr.layers import from_dense
from gblr.layers import GBLRLinear, StructuredLinear, to_inference as layer_inference
from gblr.system.errors import BadInput

log = logging.getLogger("gblr")
VIT_TARGETS = ("attn.q", "attn.k", "attn.v", "mlp.fc1", "mlp.fc2")
GPT2_TARGETS = ("attn.c_attn", "mlp.c_fc", "mlp.c_proj")
QKV = ("q", "k", "v")  # the layers split_qkv cuts timm's fused attn.qkv into, in its row order


def is_qkv_part(name: str) -> bool:
    """Whether a target or layer name is attn.q, attn.k or attn.v: a part of timm's fused qkv."""
    return name.rsplit(".", 1)[-1] in QKV


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The paper's replaced layers for a timm ViT or an HF GPT-2 (see the module docstring)."""
    if isinstance(model, VisionTransformer):
        return VIT_TARGETS
    if any(isinstance(m, Conv1D) for m in model.modules()):
        return GPT2_TARGETS
    raise BadInput(f"no default targets for {type(model).__name__}; pass targets explicitly")


class ConcatQKV(nn.Module):
    """Stands in for timm's fused ``attn.qkv`` after ``split_qkv``: x (..., dim) -> (..., 3 * attn_dim).

    Returns cat(attn.q(x), attn.k(x), attn.v(x)), the fused layer's output layout, so timm's
    ``Attention.forward`` runs unchanged. q, k, v are children of the attention module, not of
    this one, so they are named ``blocks.i.attn.q`` etc. and replacing ``attn.q`` later is seen here.
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        object.__setattr__(self, "attn", attn)  # a back-reference, not a child (no parameters here)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.attn.q(x), self.attn.k(x), self.attn.v(x)], dim=-1)

    def extra_repr(self) -> str:
        return "cat(attn.q, attn.k, attn.v)"


@torch.no_grad()
def split_qkv(model: nn.Module) -> int:
    """Split every timm Attention's fused qkv Linear(dim, 3 * attn_dim) into q, k, v Linear(dim, attn_dim).

    The model's outputs are unchanged (same weights, same order: timm reshapes qkv's output as
    (3, heads, head_dim), so rows [0, d) are q, [d, 2d) k, [2d, 3d) v). Idempotent; returns the
    number of attention modules split.
    """
    count = 0
    for attn in model.modules():
        if not isinstance(attn, Attention) or not isinstance(attn.qkv, nn.Linear):
            continue
        fused, d = attn.qkv, attn.attn_dim
        for i, part in enumerate(QKV):
            layer = nn.Linear(fused.in_features, d, bias=fused.bias is not None,
                              device=fused.weight.device, dtype=fused.weight.dtype)
            layer.weight.copy_(fused.weight[i * d:(i + 1) * d])
            if fused.bias is not None:
                layer.bias.copy_(fused.bias[i * d:(i + 1) * d])
            setattr(attn, part, layer)
        attn.qkv = ConcatQKV(attn)
        count += 1
    return count


def matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def dense_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, in) weight and (out,) bias of an nn.Linear or an HF Conv1D (whose weight is (in, out))."""
    if isinstance(module, Conv1D):
        return module.weight.T, module.bias
    return module.weight, module.bias


def resolve_targets(model: nn.Module, targets) -> tuple[str, ...]:
    """targets as a tuple of module-name suffixes; None means ``default_targets(model)``."""
    return default_targets(model) if targets is None else (targets,) if isinstance(targets, str) else tuple(targets)


def target_weights(model: nn.Module, targets) -> list[tuple[str, torch.Tensor]]:
    """(name, (out, in) weight) of the layers ``target_layers`` would give, read without changing the
    model: a q, k or v target reads its third of timm's fused qkv (``split_qkv`` cuts it later)."""
    targets = resolve_targets(model, targets)
    fused = [t.rpartition(".")[0] + ".qkv" for t in targets if is_qkv_part(t)]
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        weight = dense_weight(module)[0]
        if any(matches(name, t) for t in fused):
            found.append((name[:-2] + QKV[0], weight[: weight.shape[0] // len(QKV)]))  # attn.q: all three alike
        elif any(matches(name, t) for t in targets):
            found.append((name, weight))
    return found


def target_layers(model: nn.Module, targets) -> list[tuple[str, nn.Module]]:
    """The nn.Linear / HF Conv1D layers whose names end with a target, [(name, layer)] in model order.

    targets: module-name suffixes, e.g. ``VIT_TARGETS`` or ``GPT2_TARGETS``; None means
    ``default_targets(model)``. A target ending in q, k or v first splits timm's fused qkv
    (``split_qkv``; the model's outputs are unchanged). Raises BadInput naming a target that
    matches no such layer.
    """
    targets = resolve_targets(model, targets)
    if any(map(is_qkv_part, targets)):
        split_qkv(model)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    for pattern in targets:
        if not any(matches(name, pattern) for name, _ in linears):
            names = ", ".join(name for name, _ in linears[:12])
            raise BadInput(f"target {pattern!r} matches no nn.Linear/Conv1D layer of {type(model).__name__}; "
                           f"targets are module-name suffixes such as 'mlp.fc1'. Linear layers: {names}"
                           f"{', ...' if len(linears) > 12 else ''}")
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
        weight, bias = dense_weight(old)
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
