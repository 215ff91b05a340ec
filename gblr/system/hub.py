"""The Hugging Face hub: what a ``pretrained=`` string names, and the one error when its weights are missing.

Loading is the libraries' own (transformers ``from_pretrained``, timm ``create_model``): they read
the local Hugging Face cache (``$HF_HOME/hub``, where ``hf download`` puts files), download only
what it lacks, and with ``HF_HUB_OFFLINE=1`` read the cache alone. Nothing here probes the network.
"""
import os
from pathlib import Path

from gblr.system.errors import BadInput, MissingInput

# A pretrained= string ending in one of these names a local weights file, never a hub name.
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def hub_offline() -> bool:
    """True when the environment forbids the Hugging Face hub (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


class WeightsNotFound(BadInput):
    """Pretrained weights named by a hub name are neither in the Hugging Face cache nor downloadable."""


def find_pretrained(pretrained: str | os.PathLike | None) -> tuple[str, str | None]:
    """What ``pretrained`` names: ("none", None), ("file", path), ("dir", path) or ("hub", name).

    A string is a local path when it exists, ends in a weight-file suffix or starts with "/", "."
    or "~" (FileNotFoundError when such a path does not exist); otherwise it is a hub name
    ("org/name", an optional "hf-hub:" prefix is dropped), resolved by the loading library.
    """
    if pretrained is None or str(pretrained).strip() == "":
        return "none", None
    text = str(pretrained)
    path = Path(text).expanduser()
    if path.exists():
        return ("dir" if path.is_dir() else "file"), str(path)
    if isinstance(pretrained, os.PathLike) or text.startswith(("/", ".", "~")) or text.endswith(WEIGHT_SUFFIXES):
        raise MissingInput(f"pretrained weights not found: {text!r} does not exist. Give an existing "
                           f"state-dict file ({', '.join(WEIGHT_SUFFIXES)}) or model folder, or "
                           f"pretrained=null for random init.")
    return "hub", text.removeprefix("hf-hub:")


def missing_weights(name: str, error: BaseException) -> WeightsNotFound:
    """The one-line error for hub weights that the loading library could not find (``error``)."""
    from huggingface_hub import constants

    why = "HF_HUB_OFFLINE=1 is set" if hub_offline() else "downloading failed"
    detail = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return WeightsNotFound(
        f"pretrained weights {name!r} are not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why} "
        f"({type(error).__name__}: {detail}). Fetch them once with `hf download {name}` (same HF_HOME), "
        f"or set model.pretrained=/path/to/a/local/folder-or-file, or model.pretrained=null for random init.")
