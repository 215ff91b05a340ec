"""Pretrained weights as both families read them: where they are, a state-dict file, whether it fits.

``pretrained`` is None (random init), a local file (a state dict: .safetensors, .pth, ...), a local
folder in the hub's layout (timm: config.json + model.safetensors, as ``timm.models.save_for_hf``
or ``hf download`` write it; transformers: a ``save_pretrained`` folder), or a hub name
("timm/vit_base_patch16_224.augreg_in21k_ft_in1k", "openai-community/gpt2"). Loading is the
library's (timm ``create_model(pretrained=True)``, transformers ``from_pretrained``); both read the
Hugging Face cache first, and only the cache when HF_HUB_OFFLINE=1. Weights that cannot be had
raise ``gblr.system.hub.WeightsNotFound`` (a BadInput naming the ``hf download`` command) or
FileNotFoundError (a missing local path). With ``allow_random_fallback=True`` those two give a
random-init model instead and the builders' ``weights`` line says why (the runner's dry run, whose
FLOP report does not depend on the weights); a file that exists but does not fit always raises.
"""
import timm
import torch

from gblr.system.errors import BadInput
from gblr.system.hub import find_pretrained


def read_state_dict(path: str) -> dict:
    """A state-dict file as a dict: timm's reader (.safetensors or torch.load with weights only; unwraps
    'state_dict' / 'model', preferring EMA weights, and strips a 'module.' prefix)."""
    try:
        return timm.models.load_state_dict(path)
    except Exception as error:  # a corrupt or foreign file: say which file and why
        raise BadInput(f"could not read pretrained weights from {path!r}: {type(error).__name__}: {error}") from error


def check_fit(model: torch.nn.Module, state: dict, path: str, skip=(), check_shapes: bool = True) -> None:
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


def locate(pretrained, allow_random_fallback: bool) -> tuple[str, str | None, str | None]:
    """find_pretrained, turning a missing local path into a random-init note when allowed."""
    try:
        return (*find_pretrained(pretrained), None)
    except FileNotFoundError as error:
        if not allow_random_fallback:
            raise
        return "none", None, random_init_note(pretrained, error)


def random_init_note(pretrained, error: Exception) -> str:
    return f"random init (pretrained {str(pretrained)!r} not loaded: {error})"
