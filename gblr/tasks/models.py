"""Build the two model families of the paper and load their pretrained weights through their libraries.

- ViT: timm ``vit_base_patch16_224`` and ``vit_tiny``, a small model of the same class and
  architecture (``timm.create_model("vit_base_patch16_224", **VIT_TINY)``; module names
  ``blocks.i.attn.qkv`` / ``attn.proj`` / ``mlp.fc1`` / ``mlp.fc2``, ``head``).
- GPT-2: Hugging Face ``GPT2LMHeadModel``, ``gpt2`` (small, 124M) and ``gpt2_tiny``, always with
  eager attention so that FLOP counters see the attention matmuls.

Both builders return ``(model, weights)``: ``weights`` is one line saying where the weights came
from ("random init", "local file ...", "local folder ...", "hub ..."), so a run can record it.

``pretrained`` is None (random init), a local file (a state dict: .safetensors, .pth, ...), a local
folder in the hub's layout (timm: config.json + model.safetensors, as ``timm.models.save_for_hf``
or ``hf download`` write it; GPT-2: a ``save_pretrained`` folder), or a hub name
("timm/vit_base_patch16_224.augreg_in21k_ft_in1k", "openai-community/gpt2"). Loading is the
library's: timm ``create_model(pretrained=True)`` (its checkpoint filter resizes position
embeddings, a classifier of another size is left at random init) and transformers
``from_pretrained``; both read the Hugging Face cache first, and only the cache when
HF_HUB_OFFLINE=1. Weights that cannot be had raise ``gblr.system.hub.WeightsNotFound`` (a BadInput naming
the ``hf download`` command) or FileNotFoundError (a missing local path). With
``allow_random_fallback=True`` those two give a random-init model instead and ``weights`` says why
(the runner's dry run, whose FLOP report does not depend on the weights); a file that exists but
does not fit the model always raises.
"""

import timm
from omegaconf import OmegaConf
import torch
from timm.models.vision_transformer import VisionTransformer
from transformers import GPT2Config, GPT2LMHeadModel

from gblr.system.config import CONFIG_DIR
from gblr.system.hub import WeightsNotFound, find_pretrained, hub_offline, missing_weights
from gblr.system.errors import BadInput

# The timm architecture behind both ViTs (vit_tiny overrides its size with VIT_TINY).
VIT_ARCH = "vit_base_patch16_224"


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


def _read_state_dict(path: str) -> dict:
    """A state-dict file as a dict: timm's reader (.safetensors or torch.load with weights only; unwraps
    'state_dict' / 'model', preferring EMA weights, and strips a 'module.' prefix)."""
    try:
        return timm.models.load_state_dict(path)
    except Exception as error:  # a corrupt or foreign file: say which file and why
        raise BadInput(f"could not read pretrained weights from {path!r}: {type(error).__name__}: {error}") from error


def _check_fit(model: torch.nn.Module, state: dict, path: str, skip=(), check_shapes: bool = True) -> None:
    """BadInput unless ``state`` has exactly the model's keys (but ``skip``), with the model's shapes
    when ``check_shapes`` (timm's checkpoint filter resizes position and patch embeddings itself).

    A tied parameter (GPT-2's lm_head.weight is wte.weight) counts as present under any of its names.
    """
    own = model.state_dict()
    names_of = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(key)
    loaded_as = {key: names for names in names_of.values() for key in names}
    missing = [key for key in own if key not in skip and not any(n in state for n in loaded_as.get(key, [key]))]
    unexpected = [key for key in state if key not in own and key not in skip]
    shapes = [f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
              for key in state if key in own and key not in skip and state[key].shape != own[key].shape] if check_shapes else []
    if missing or unexpected or shapes:
        raise BadInput(f"pretrained weights {path!r} do not fit the model: missing {missing[:5]}"
                       f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                       f"{' ...' if len(unexpected) > 5 else ''}, shape mismatches {shapes[:5]}. "
                       f"Check that the model name and its options match the checkpoint.")


def _locate_or_fallback(pretrained, allow_random_fallback: bool) -> tuple[str, str | None, str | None]:
    """find_pretrained, turning a missing local path into a random-init note when allowed."""
    try:
        return (*find_pretrained(pretrained), None)
    except FileNotFoundError as error:
        if not allow_random_fallback:
            raise
        return "none", None, _random_init_note(pretrained, error)


def _random_init_note(pretrained, error: Exception) -> str:
    return f"random init (pretrained {str(pretrained)!r} not loaded: {error})"


def _vit_args(name: str, kwargs: dict) -> dict:
    if name not in ("vit_base", "vit_tiny"):
        raise BadInput(f"unknown ViT {name!r}; choose 'vit_base' or 'vit_tiny'")
    return {**VIT_TINY, **kwargs} if name == "vit_tiny" else dict(kwargs)


def vit_pretrained_cfg(name: str, pretrained: str | None, **kwargs) -> dict | None:
    """timm's pretrained config of the weights ``pretrained`` names (mean, std, interpolation, ...),
    None for random init. A hub name reads only its config.json (from the cache when offline); a
    bare state-dict file has none of its own: the architecture's default (timm's ViT-B/16 augreg)."""
    from timm.models._hub import load_model_config_from_hf, load_model_config_from_path  # what create_model uses

    _vit_args(name, kwargs)
    where, source = find_pretrained(pretrained)
    if where == "none":
        return None
    if where == "dir":
        try:
            return load_model_config_from_path(source)[0]
        except KeyError as error:  # a config.json without timm's "architecture"
            raise BadInput(f"{source!r} is not a timm model folder (config.json lacks {error}); a ViT folder "
                           f"holds timm's config.json + model.safetensors, as timm.models.save_for_hf writes them") from None
    if where == "hub":
        try:
            return load_model_config_from_hf(source)[0]
        except OSError as error:
            raise missing_weights(source, error) from None
    return timm.models.get_pretrained_cfg(VIT_ARCH).to_dict()


def vit_data_config(pretrained_cfg: dict | None) -> dict | None:
    """The normalization (``mean``, ``std``) of a pretrained config (``vit_pretrained_cfg``), via
    ``timm.data.resolve_data_config``; None for random init (the data's default applies)."""
    if pretrained_cfg is None:
        return None
    config = timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg)
    return {"mean": tuple(config["mean"]), "std": tuple(config["std"])}


def build_vit(name: str, pretrained: str | None = None, allow_random_fallback: bool = False,
              **kwargs) -> tuple[VisionTransformer, str]:
    """A timm VisionTransformer and where its weights came from.

    name: "vit_base" (timm ``vit_base_patch16_224``: 224 px, patch 16, 768 wide, 12 blocks, 1000
    classes) or "vit_tiny" (same architecture, ``VIT_TINY``: 32 px, patch 4, 64 wide, 4 blocks,
    4 heads, 10 classes). ``kwargs`` go to ``timm.create_model`` (img_size, patch_size, in_chans,
    num_classes, embed_dim, depth, num_heads, drop_path_rate, ...) and override a folder's or hub
    repository's saved arguments. pretrained: see the module docstring.
    Returns (model, weights) with model in train mode; input (B, in_chans, img_size, img_size),
    output logits (B, num_classes).
    """
    args = _vit_args(name, kwargs)
    where, source, note = _locate_or_fallback(pretrained, allow_random_fallback)
    if where == "file":
        state = _read_state_dict(source)
        with torch.device("meta"):  # the architecture's keys and shapes, without an init
            reference = timm.create_model(VIT_ARCH, **args)
        head = [k for k in ("head.weight", "head.bias") if k in state and k in reference.state_dict()
                and state[k].shape != reference.state_dict()[k].shape]
        _check_fit(reference, state, source, skip=head, check_shapes=False)  # timm loads non-strictly when it drops a head
        classes = state["head.weight"].shape[0] if "head.weight" in state else args.get("num_classes", 1000)
        del state, reference
        model = _create_vit(VIT_ARCH, source, pretrained_cfg_overlay=dict(file=source, num_classes=classes), **args)
        note = f"local file {source}"
        if head:
            note += f" (head re-initialized: checkpoint has {classes} classes, model {model.num_classes})"
    elif where == "dir":
        model = _create_vit(f"local-dir:{source}", source, **args)
        note = f"local folder {source}"
    elif where == "hub":
        try:
            model = _create_vit(f"hf-hub:{source}", source, **args)
            note = f"hub {source}"
        except WeightsNotFound as error:
            if not allow_random_fallback:
                raise
            model, note = timm.create_model(VIT_ARCH, **args), _random_init_note(source, error)
    else:
        model = timm.create_model(VIT_ARCH, **args)
    if not isinstance(model, VisionTransformer):
        raise BadInput(f"pretrained={pretrained!r} holds a {type(model).__name__}, not a timm VisionTransformer")
    return model, note or "random init"


def _create_vit(model_name: str, source: str, **kwargs) -> torch.nn.Module:
    """timm.create_model(model_name, pretrained=True), its errors as ours: missing hub weights as
    WeightsNotFound, weights that do not fit as a BadInput naming ``source``."""
    try:
        return timm.create_model(model_name, pretrained=True, **kwargs)
    except OSError as error:
        if model_name.startswith("hf-hub:"):
            raise missing_weights(source, error) from None
        raise BadInput(f"could not read pretrained weights from {source!r}: {type(error).__name__}: {error}") from None
    except KeyError as error:  # a config.json without timm's "architecture"
        raise BadInput(f"{source!r} is not a timm model folder (config.json lacks {error}); a ViT folder holds "
                       f"timm's config.json + model.safetensors, as timm.models.save_for_hf writes them") from None
    except RuntimeError as error:  # load_state_dict's missing / unexpected keys, shape mismatches
        first = str(error).strip().splitlines()
        raise BadInput(f"pretrained weights {source!r} do not fit the model: "
                       f"{' '.join(line.strip() for line in first[:3])}") from None


def build_gpt2(name: str, pretrained: str | None = None, allow_random_fallback: bool = False,
               **config_overrides) -> tuple[GPT2LMHeadModel, str]:
    """A Hugging Face GPT2LMHeadModel with eager attention, and where its weights came from.

    name: "gpt2" (``GPT2Config()``: 768 wide, 12 layers, 12 heads, 1024 positions, vocab 50257) or
    "gpt2_tiny" (``GPT2_TINY``: 64 wide, 2 layers, 2 heads, 128 positions; pass ``vocab_size`` to
    match a local tokenizer). ``config_overrides`` are GPT2Config fields.
    pretrained: see the module docstring; a folder or hub name goes through ``from_pretrained``
    (with ``local_files_only=True`` when HF_HUB_OFFLINE=1), a state-dict file is loaded strictly.
    Returns (model, weights); input token ids (B, T) with T <= n_positions, output logits
    (B, T, vocab_size).
    """
    if name not in ("gpt2", "gpt2_tiny"):
        raise BadInput(f"unknown GPT-2 {name!r}; choose 'gpt2' or 'gpt2_tiny'")
    where, source, note = _locate_or_fallback(pretrained, allow_random_fallback)
    if where in ("hub", "dir"):
        try:
            model = GPT2LMHeadModel.from_pretrained(source, attn_implementation="eager",
                                                    local_files_only=where == "dir" or hub_offline(),
                                                    **config_overrides)
            return model, f"{'hub' if where == 'hub' else 'local folder'} {source}"
        except OSError as error:
            if where == "dir":
                raise BadInput(f"could not read pretrained weights from {source!r}: {error}") from None
            if not allow_random_fallback:
                raise missing_weights(source, error) from None
            note = _random_init_note(source, missing_weights(source, error))
    defaults = GPT2_TINY if name == "gpt2_tiny" else {}
    model = GPT2LMHeadModel(GPT2Config(**{**defaults, **config_overrides}, attn_implementation="eager"))
    if where == "file":
        state = _read_state_dict(source)
        _check_fit(model, state, source)
        model.load_state_dict(state, strict=False)  # a tied twin may be absent, all else checked above
        return model, f"local file {source}"
    return model, note or "random init"
