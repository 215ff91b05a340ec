"""Analytic MAC accounting of a forward pass, in the three conventions of docs/method.md.

Everything here is in MACs (multiply-accumulates; 1 MAC = 2 FLOPs). Vision papers call MACs
"FLOPs" ("ViT-B 17.6 GFLOPs"), and so does the Gaudi-GBLR paper. Structured layers are counted
from their ``macs_per_token()``, never by running them: a layer that materializes its masked dense
weight executes dense work but costs what its structure costs. Counted: every linear layer
(structured, nn.Linear, HF Conv1D), the two attention matmuls (Q K^T and A V, 2 T^2 d per block,
causal masking not exploited), the patch-embedding convolution. Not counted: norms, activations,
softmax, biases, embedding lookups.

Relative cost, three conventions:
- ``replaced``: MACs of the structured layers / their dense MACs (what ``budget`` targets);
- ``model``: the whole forward pass / the same model with every structured layer dense;
- ``paper``: the Gaudi-GBLR paper's numbers (ViT-B/16 at 224 px, GPT-2 small), None otherwise.
"""
from torch import nn
from timm.models.vision_transformer import Attention, VisionTransformer
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2Block
from transformers.pytorch_utils import Conv1D

from gblr.layers import StructuredLinear
from gblr.structure.surgery import structured_layers
from gblr.system.errors import BadInput

# Paper denominators. ViT-B/16: the paper's dense model, 17.2 G. GPT-2 small at 1024
# tokens: 12 * (1024 * 768 * (2304 + 768 + 3072 + 3072) + 1024^2 * 768), printed as 9.66e10.
VIT_B16_PAPER_DENSE_MACS = 1.72e10
VIT_B16_PAPER_TOKENS = 196  # the paper counts its structured layers at the 196 patches, without the class token
GPT2_PAPER_DENSE_MACS = 96_636_764_160
GPT2_PAPER_TOKENS = 1024
# The official code's counters (docs/method.md, "The three FLOP conventions"): for ViT-B/16 fvcore's
# leaf modules only (no attention matmuls; LayerNorms at 5 per element), over 1.72e10; for GPT-2 the
# formula above over the printed 9.66e10.
LAYER_NORM_MACS_PER_ELEMENT = 5
GPT2_OFFICIAL_DENSE_MACS = 9.66e10


def _linear_costs(module: nn.Module) -> tuple[int, int, bool] | None:
    """(MACs per token, dense MACs per token, structured?) of a linear layer; None for other modules."""
    if isinstance(module, StructuredLinear):
        return module.macs_per_token(), module.dense_macs_per_token(), True
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features, module.in_features * module.out_features, False
    if isinstance(module, Conv1D):  # HF GPT-2: weight (in, out)
        return module.weight.numel(), module.weight.numel(), False
    return None


def _linears(model: nn.Module):
    """(name, MACs/token, dense MACs/token, structured?) for every linear layer, not descending into them."""
    found, inside = [], None
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        costs = _linear_costs(module)
        if costs is not None:
            found.append((name, *costs))
            inside = name + "."
    return found


def _report(layers, other_macs: int, attention_macs: int, tokens: int, paper_macs: float | None,
            paper_dense_macs: float | None, paper_convention: str | None,
            official_ratio: float | None = None) -> dict:
    """The MAC report (see ``count_macs``) from (name, tokens, MACs/token, dense MACs/token, structured?) rows."""
    linear = sum(t * mpt for _, t, mpt, _, _ in layers)
    linear_dense = sum(t * dense for _, t, _, dense, _ in layers)
    replaced = sum(t * mpt for _, t, mpt, _, structured in layers if structured)
    replaced_dense = sum(t * dense for _, t, _, dense, structured in layers if structured)
    macs, dense_macs = linear + attention_macs + other_macs, linear_dense + attention_macs + other_macs
    return {
        "unit": "MACs (multiply-accumulates; FLOPs = 2 x MACs)",
        "tokens": tokens,
        "macs": macs,
        "dense_macs": dense_macs,
        "attention_macs": attention_macs,
        "replaced_macs": replaced,
        "replaced_dense_macs": replaced_dense,
        "relative_replaced": replaced / replaced_dense if replaced_dense else None,
        "relative_model": macs / dense_macs,
        "relative_paper": paper_macs / paper_dense_macs if paper_macs is not None else None,
        "paper_macs": paper_macs,
        "paper_convention": paper_convention,
        "relative_paper_official": official_ratio,
    }


def _is_vit_b16_224(model: VisionTransformer, tokens: int) -> bool:
    return (tuple(model.patch_embed.img_size) == (224, 224) and tuple(model.patch_embed.patch_size) == (16, 16)
            and model.embed_dim == 768 and len(model.blocks) == 12 and model.num_prefix_tokens == 1
            and tokens == 197 and model.patch_embed.proj.in_channels == 3)


def vit_macs(model: VisionTransformer, tokens: int | None = None) -> dict:
    """MACs of one image through a timm ViT (batch 1), structured layers counted analytically.

    tokens: sequence length T through the blocks (patches + class/register tokens); default the
    model's own (197 for ViT-B/16 at 224 px). Blocks' linears run on T tokens, attention costs
    2 T^2 attn_dim per block, the patch conv (T - prefix) * embed_dim * in_chans * p^2, the head
    one token (pooled). Returns the dict of ``count_macs``; relative_paper only for ViT-B/16 at
    224 px: structured layers at 196 tokens, everything else as counted here, over 1.72e10.
    """
    if not isinstance(model, VisionTransformer):
        raise BadInput(f"vit_macs needs a timm VisionTransformer, got {type(model).__name__}")
    if model.global_pool == "map":
        raise BadInput("attention-pooling heads (global_pool='map') are not counted; use 'token' or 'avg'")
    prefix = model.num_prefix_tokens
    tokens = model.patch_embed.num_patches + prefix if tokens is None else tokens
    conv = model.patch_embed.proj
    conv_macs = (tokens - prefix) * conv.weight.numel()  # one output pixel per patch: out * in/groups * kh * kw
    attention_macs = sum(2 * tokens**2 * m.attn_dim for m in model.modules() if isinstance(m, Attention))
    # The head sees one pooled token per image; every other linear sees all T tokens.
    layers = [(name, 1 if name == "head" or name.startswith("head.") else tokens, mpt, dense, structured)
              for name, mpt, dense, structured in _linears(model)]
    paper_macs = official = None
    if _is_vit_b16_224(model, tokens):
        paper_layers = [(n, VIT_B16_PAPER_TOKENS if structured and t == tokens else t, mpt, dense, structured)
                        for n, t, mpt, dense, structured in layers]
        linear_macs = sum(t * mpt for _, t, mpt, _, _ in paper_layers)
        paper_macs = linear_macs + attention_macs + conv_macs
        norms = sum(LAYER_NORM_MACS_PER_ELEMENT * tokens * m.weight.numel()
                    for m in model.modules() if isinstance(m, nn.LayerNorm))
        official = (linear_macs + conv_macs + norms) / VIT_B16_PAPER_DENSE_MACS
    return _report(layers, conv_macs, attention_macs, tokens, paper_macs, VIT_B16_PAPER_DENSE_MACS,
                   "ViT-B/16: structured layers at 196 tokens, the rest dense at 197, over 1.72e10"
                   if paper_macs is not None else None, official)


def _is_gpt2_small(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return (config is not None and config.n_embd == 768 and config.n_layer == 12 and config.n_head == 12
            and (config.n_inner or 4 * config.n_embd) == 3072)


def gpt2_macs(model: nn.Module, seq_len: int | None = None) -> dict:
    """MACs of one sequence of ``seq_len`` tokens through an HF GPT-2 (batch 1), LM head included.

    seq_len defaults to ``config.n_positions``. Every linear (Conv1D or structured, and the LM
    head) runs on all T tokens; attention costs 2 T^2 n_embd per block; embeddings cost nothing.
    Returns the dict of ``count_macs``. relative_paper (GPT-2 small only) is the paper's formula at
    a fixed 1024 tokens whatever seq_len is: (block linears' MACs/token * 1024 + 12 * 1024^2 * 768)
    / 96,636,764,160, LM head and embeddings excluded.
    """
    attentions = [m for m in model.modules() if isinstance(m, GPT2Attention)]
    if not attentions:
        raise BadInput(f"gpt2_macs needs a Hugging Face GPT-2 model, got {type(model).__name__}")
    tokens = model.config.n_positions if seq_len is None else seq_len
    attention_macs = sum(2 * tokens**2 * m.embed_dim for m in attentions)
    layers = [(name, tokens, mpt, dense, structured) for name, mpt, dense, structured in _linears(model)]
    paper_macs = None
    if _is_gpt2_small(model):
        # The paper's "attention" term is one T^2 d matmul per block; attn.c_proj enters at its own cost.
        blocks = [m for m in model.modules() if isinstance(m, GPT2Block)]
        block_mpt = sum(mpt for block in blocks for _, mpt, _, _ in _linears(block))
        paper_macs = block_mpt * GPT2_PAPER_TOKENS + len(blocks) * GPT2_PAPER_TOKENS**2 * 768
    official = paper_macs / GPT2_OFFICIAL_DENSE_MACS if paper_macs is not None else None
    return _report(layers, 0, attention_macs, tokens, paper_macs, GPT2_PAPER_DENSE_MACS,
                   "GPT-2 small: block linears + 12 x 1024^2 x 768 at 1024 tokens, over 96,636,764,160"
                   if paper_macs is not None else None, official)


def count_macs(model: nn.Module, tokens: int | None = None) -> dict:
    """MACs of one example's forward pass: ``vit_macs`` for a timm ViT, ``gpt2_macs`` for an HF GPT-2.

    tokens: the sequence length (None: the model's own). Returns a dict, all counts in MACs:
    unit; tokens; macs (the forward pass); dense_macs (the same with every structured layer
    dense, from the shapes); attention_macs (the attention matmuls, in both); replaced_macs and
    replaced_dense_macs (the structured layers only); relative_replaced (None without structured
    layers), relative_model, relative_paper (None where the paper has no convention), paper_macs,
    paper_convention (a label saying which, or None), relative_paper_official (what the paper's
    official code reports for the same model: for ViT-B/16 without the attention matmuls and with
    LayerNorms; None elsewhere).
    """
    if isinstance(model, VisionTransformer):
        return vit_macs(model, tokens)
    return gpt2_macs(model, tokens)


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
            "model": macs["relative_model"], "paper": macs["relative_paper"],
            "paper_convention": macs["paper_convention"], "paper_official": macs["relative_paper_official"]}
