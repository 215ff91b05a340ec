"""Token streams: one split's token ids end to end, cached on disk, and cut into training blocks.

A stream is tokenized once and saved as a 1-D .npy array through `atomic_write` (so a crash
never leaves a truncated cache that a later run would trust), then re-opened memory-mapped and
read-only (np.load(mmap_mode="r")), so a run never holds a whole corpus in memory.

Cache layout: <cache_dir>/<dataset>/<split>-<key>.npy, key = the first 16 hex digits of the sha1
of the JSON list of everything the ids depend on (source, split, tokenizer fingerprint); a
change to any of them gives a new file, never a stale one. dtype: uint16 when the vocabulary has
at most 65,536 ids, else uint32.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from gblr.data import default_cache_dir
from gblr.system.files import cached
from gblr.system.errors import BadInput


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def cache_path(cache_dir, dataset: str, split: str, key_parts: list) -> Path:
    """<cache_dir or the default>/<dataset>/<split>-<sha1 of json(key_parts), 16 hex>.npy"""
    key = sha1(json.dumps(key_parts))[:16]
    return Path(cache_dir or default_cache_dir()).expanduser() / dataset / f"{split}-{key}.npy"


def cached_tokens(path: Path, make_ids, vocab_size: int) -> np.ndarray:
    """The token stream at path, memory-mapped; make_ids() -> 1-D int array builds it once.

    Returns a read-only np.memmap of shape (n_tokens,), uint16 or uint32 by vocab_size. The file is
    a checksummed cache entry (``gblr.system.files.cached``): a corrupt one is made again, with a warning.
    """

    def save(tmp):
        ids = np.asarray(make_ids()).astype(np.uint16 if vocab_size <= 2**16 else np.uint32)
        with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a bare name
            np.save(f, ids)

    def load(path):
        ids = np.load(path, mmap_mode="r")
        if len(ids) and int(ids.max()) >= vocab_size:
            raise BadInput(f"token id {int(ids.max())} is outside the tokenizer's {vocab_size} ids")
        return ids

    return cached(path, path.stem, save, load)


class TokenBlocks(torch.utils.data.Dataset):
    """Non-overlapping blocks of a token stream: item i covers tokens[i*block_size : (i+1)*block_size].

    Items are {"input_ids": int64 (block_size,), "labels": the same ids}: the model shifts the
    labels itself (Hugging Face convention). The ragged tail, len(tokens) % block_size tokens, is
    dropped.
    """

    def __init__(self, tokens, block_size: int):
        if len(tokens) < block_size:
            raise BadInput(f"only {len(tokens)} tokens, fewer than one block of block_size={block_size}")
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self):
        return len(self.tokens) // self.block_size

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} out of range for {len(self)} blocks")
        start = i * self.block_size
        ids = torch.from_numpy(np.asarray(self.tokens[start : start + self.block_size], dtype=np.int64))
        return {"input_ids": ids, "labels": ids.clone()}
