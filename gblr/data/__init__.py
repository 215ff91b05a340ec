"""Datasets: vision.py (ImageNet folders, embedded digits), text.py (WikiText-103, embedded pydoc text)."""
import os
from pathlib import Path


def default_cache_dir() -> Path:
    """The gblr cache root: $GBLR_CACHE, else ~/.cache/gblr; each dataset uses a subfolder of it."""
    return Path(os.environ.get("GBLR_CACHE") or Path.home() / ".cache" / "gblr").expanduser()
