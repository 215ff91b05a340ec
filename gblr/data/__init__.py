"""Datasets, prepared once into the cache and then loaded.

vision.py: ImageNet folders and the embedded digits. text.py: `build_text_data`, composing
wikitext.py (WikiText-103 sources), pydoc_text.py (the embedded pydoc corpus), tokenization.py
(tokenizers, the local BPE) and token_stream.py (the .npy token cache, training blocks).
"""
import os
from pathlib import Path


def default_cache_dir() -> Path:
    """The gblr cache root: $GBLR_CACHE, else ~/.cache/gblr; each dataset uses a subfolder of it."""
    return Path(os.environ.get("GBLR_CACHE") or Path.home() / ".cache" / "gblr").expanduser()
