"""The Hugging Face hub: whether it may be used, whether it answers, and where pretrained weights come from.

The answer is found before any download starts, so that a machine without network fails within
seconds, with a message naming the local alternative, rather than somewhere inside a download.
"""
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

# A pretrained= string ending in one of these names a local weights file, never a hub name.
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def hub_offline() -> bool:
    """True when the environment forbids the Hugging Face hub (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the hub (or the HTTPS proxy in between) opens within ``timeout_s``."""
    url = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or \
        os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(url if "://" in url else f"http://{url}")
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def find_pretrained(pretrained: str | os.PathLike | None) -> tuple[str, str | None]:
    """Where ``pretrained`` weights come from: ("none", None), ("local", path) or ("hub", name).

    A string is a local path when it exists, ends in a weight-file suffix or starts with
    "/", "." or "~"; otherwise it is a hub name. Raises FileNotFoundError for a local path that
    does not exist, and ValueError (fast, before any download) for a hub name while the hub is off
    (HF_HUB_OFFLINE=1) or unreachable; both messages say how to provide a local file instead.
    """
    if pretrained is None or str(pretrained).strip() == "":
        return "none", None
    text = str(pretrained)
    path = Path(text).expanduser()
    if path.exists():
        return "local", str(path)
    if isinstance(pretrained, os.PathLike) or text.startswith(("/", ".", "~")) or text.endswith(WEIGHT_SUFFIXES):
        raise FileNotFoundError(f"pretrained weights not found: {text!r} does not exist. Give an existing "
                                f"state-dict file ({', '.join(WEIGHT_SUFFIXES)}) or model directory, or "
                                f"pretrained=null for random init.")
    why = "HF_HUB_OFFLINE=1 is set" if hub_offline() else None
    if why is None and not hub_reachable():
        why = "the Hugging Face hub cannot be reached from this machine"
    if why:
        raise ValueError(f"cannot download pretrained weights {text!r}: {why}. It is not a local path either. "
                         f"On a machine with network, download it (e.g. `huggingface-cli download {text}`) and "
                         f"pass the local file or directory as pretrained=/path/to/weights, or use "
                         f"pretrained=null for random init.")
    return "hub", text
