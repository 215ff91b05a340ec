"""Build the two model families of the paper and load their pretrained weights.

- ViT: timm ``vit_base_patch16_224`` and ``vit_tiny``, a small model of the same class (module names
  ``blocks.i.attn.qkv`` / ``attn.proj`` / ``mlp.fc1`` / ``mlp.fc2``, ``head``).
- GPT-2: Hugging Face ``GPT2LMHeadModel``, ``gpt2`` (small, 124M) and ``gpt2_tiny``, always with
  eager attention so that FLOP counters see the attention matmuls.

Both builders return ``(model, weights)``: ``weights`` is one line saying where the weights came
from ("random init", "local file ...", "hub ..."), so a run can record it next to its numbers.

``pretrained`` is None (random init), a local path (ViT: a state-dict file; GPT-2: a
``save_pretrained`` directory or a state-dict file), or a hub name, downloaded only when the hub
is reachable. ``gblr.hub.find_pretrained`` says which, and raises when the weights cannot be had:
FileNotFoundError for a missing local path, ValueError for a hub name while offline. With
``allow_random_fallback=True`` those two cases give a random-init model instead and ``weights``
says why (the runner's dry run uses this); a file that exists but does not fit the model always
raises.
"""
import os

import timm
from omegaconf import OmegaConf
import torch
from timm.models.vision_transformer import VisionTransformer
from transformers import GPT2Config, GPT2LMHeadModel

from gblr.config import CONFIG_DIR
from gblr.hub import WEIGHT_SUFFIXES, find_pretrained

def _tiny_kwargs(name: str) -> dict:
    """The tiny models' architecture, owned by their config file (configs/model/NAME.yaml, kwargs)."""
    return dict(OmegaConf.load(CONFIG_DIR / "model" / f"{name}.yaml").kwargs)


# timm's VisionTransformer arguments of the tiny ViT: 8x8 digits upscaled to 32x32, 8x8 patches of 4 px.
VIT_TINY = dict(in_chans=3, num_classes=10, mlp_ratio=4.0, **_tiny_kwargs("vit_tiny"))
# GPT2Config overrides of the tiny GPT-2; every other field keeps GPT2Config's default (vocab 50257).
GPT2_TINY = _tiny_kwargs("gpt2_tiny")


def vit_input_size(name: str, kwargs: dict) -> int:
    """The side in pixels of the images ViT ``name`` built with ``kwargs`` takes."""
    return kwargs.get("img_size") or (VIT_TINY["img_size"] if name == "vit_tiny" else 224)


def gpt2_context(name: str, kwargs: dict) -> int:
    """The context (positions) of GPT-2 ``name`` built with ``kwargs``."""
    return kwargs.get("n_positions") or (GPT2_TINY["n_positions"] if name == "gpt2_tiny" else 1024)


def _load_state_dict_file(model: torch.nn.Module, path: str) -> str:
    """Load a state-dict file (or a checkpoint dict holding one under 'model'/'state_dict') into model.

    Loading is strict, except that a classifier head of another size is dropped and left at its
    random init (fine-tuning on another label set). Returns a note on what was loaded.
    """
    if os.path.isdir(path):
        raise ValueError(f"pretrained={path!r} is a directory; this model needs a state-dict file "
                         f"({', '.join(WEIGHT_SUFFIXES)})")
    try:
        # timm's loader: .safetensors or torch.load (weights only), unwraps 'state_dict'/'model'
        # (preferring EMA weights when present) and strips a 'module.' prefix.
        state = timm.models.load_state_dict(path)
    except Exception as error:  # a corrupt or foreign file: say which file and why
        raise ValueError(f"could not read pretrained weights from {path!r}: {type(error).__name__}: {error}") from error
    note = f"local file {path}"
    own = model.state_dict()
    head = [key for key in ("head.weight", "head.bias")
            if key in state and key in own and state[key].shape != own[key].shape]
    if head:
        note += (f" (head re-initialized: checkpoint has {state['head.weight'].shape[0]} classes, "
                 f"model {own['head.weight'].shape[0]})")
        for key in head:
            del state[key]
    # A tied parameter (GPT-2's lm_head.weight is wte.weight) is loaded through any of its names.
    names_of = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(key)
    loaded_as = {key: names for names in names_of.values() for key in names}
    missing = [key for key in own if key not in head and not any(n in state for n in loaded_as.get(key, [key]))]
    unexpected = [key for key in state if key not in own]
    shapes = [f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
              for key in state if key in own and state[key].shape != own[key].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"pretrained weights {path!r} do not fit the model: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}, shape mismatches {shapes[:5]}. "
                         f"Check that the model name and its options match the checkpoint.")
    model.load_state_dict(state, strict=False)  # `head` keys may be absent on purpose, all else checked above
    return note


def _locate_or_fallback(pretrained, allow_random_fallback: bool) -> tuple[str, str | None, str | None]:
    """find_pretrained, turning 'weights unavailable' into a random-init note when allowed."""
    try:
        return (*find_pretrained(pretrained), None)
    except (FileNotFoundError, ValueError) as error:
        if not allow_random_fallback:
            raise
        return "none", None, f"random init (pretrained {str(pretrained)!r} not loaded: {error})"


def build_vit(name: str, pretrained: str | None = None, allow_random_fallback: bool = False,
              **kwargs) -> tuple[VisionTransformer, str]:
    """A timm VisionTransformer and where its weights came from.

    name: "vit_base" (timm ``vit_base_patch16_224``: 224 px, patch 16, 768 wide, 12 blocks, 1000
    classes) or "vit_tiny" (same class, ``VIT_TINY`` defaults: 32 px, patch 4, 64 wide, 4 blocks,
    4 heads, 10 classes). ``kwargs`` go to the VisionTransformer constructor (img_size,
    patch_size, in_chans, num_classes, embed_dim, depth, num_heads, drop_path_rate, ...).
    pretrained: None, a local state-dict file, or (vit_base only) a timm hub name such as
    "timm/vit_base_patch16_224.augreg_in21k_ft_in1k"; see ``find_pretrained``.
    Returns (model, weights) with model in train mode; input (B, in_chans, img_size, img_size),
    output logits (B, num_classes).
    """
    if name not in ("vit_base", "vit_tiny"):
        raise ValueError(f"unknown ViT {name!r}; choose 'vit_base' or 'vit_tiny'")
    where, source, note = _locate_or_fallback(pretrained, allow_random_fallback)
    if where == "hub":
        if name != "vit_base":
            raise ValueError(f"hub weights exist only for vit_base; for {name!r} give a local file, got {source!r}")
        arch = source.removeprefix("timm/").removeprefix("hf-hub:timm/")
        if arch.split(".")[0] != "vit_base_patch16_224":
            raise ValueError(f"hub weights {source!r} are not vit_base_patch16_224 weights; "
                             f"use e.g. 'timm/vit_base_patch16_224.augreg_in21k_ft_in1k'")
        return timm.create_model(arch, pretrained=True, **kwargs), f"hub {source}"
    if name == "vit_base":
        model = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)
    else:
        model = VisionTransformer(**{**VIT_TINY, **kwargs})
    if where == "local":
        return model, _load_state_dict_file(model, source)
    return model, note or "random init"


def build_gpt2(name: str, pretrained: str | None = None, allow_random_fallback: bool = False,
               **config_overrides) -> tuple[GPT2LMHeadModel, str]:
    """A Hugging Face GPT2LMHeadModel with eager attention, and where its weights came from.

    name: "gpt2" (``GPT2Config()``: 768 wide, 12 layers, 12 heads, 1024 positions, vocab 50257) or
    "gpt2_tiny" (``GPT2_TINY``: 64 wide, 2 layers, 2 heads, 128 positions; pass ``vocab_size`` to
    match a local tokenizer). ``config_overrides`` are GPT2Config fields.
    pretrained: None, a local ``save_pretrained`` directory or state-dict file, or a hub name
    such as "openai-community/gpt2"; see ``find_pretrained``. Returns (model, weights); input
    token ids (B, T) with T <= n_positions, output logits (B, T, vocab_size).
    """
    if name not in ("gpt2", "gpt2_tiny"):
        raise ValueError(f"unknown GPT-2 {name!r}; choose 'gpt2' or 'gpt2_tiny'")
    where, source, note = _locate_or_fallback(pretrained, allow_random_fallback)
    if where == "hub" or (where == "local" and os.path.isdir(source)):
        model = GPT2LMHeadModel.from_pretrained(source, attn_implementation="eager", **config_overrides)
        return model, f"{'hub' if where == 'hub' else 'local directory'} {source}"
    defaults = GPT2_TINY if name == "gpt2_tiny" else {}
    model = GPT2LMHeadModel(GPT2Config(**{**defaults, **config_overrides}, attn_implementation="eager"))
    if where == "local":
        return model, _load_state_dict_file(model, source)
    return model, note or "random init"
