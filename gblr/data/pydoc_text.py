"""The embedded offline corpus: CPython's own `pydoc_data.topics`, its split, BPE and token streams.

About 465k characters of English reference prose in 79 topics; the exact text depends on the
Python version, which is therefore part of every cache key (through the text's sha1). Split by
topic, a byte-level BPE is trained on the train topics only, and one <|endoftext|> id is appended
after every topic (the topics are independent documents). It is named for what it is: no number
computed on it is a WikiText result.

Cache: <cache_dir>/pydoc/bpe-<vocab_size>-<sha1 of the train text, 12 hex>/tokenizer.json (the
BPE) and <cache_dir>/pydoc/<split>-<key>.npy (the token streams, see gblr.data.token_stream).
"""

from pathlib import Path

import numpy as np

from gblr.data import default_cache_dir
from gblr.data.token_stream import cache_path, cached_tokens, sha1
from gblr.data.tokenization import EOS, backend, byte_level_bpe, encode_lines, eos_id, tokenizer_fingerprint
from gblr.system.errors import BadInput

PYDOC_DESCRIPTION = "pydoc_data.topics (CPython reference text)"


def pydoc_topics(split: str) -> list[str]:
    """The pydoc topic texts of one split, in sorted topic-name order.

    Topics are sorted by name; topic i goes to "validation" when i % 10 == 5, else to "train"
    (8 of 79 topics, about 8% of the characters, on CPython 3.11). Splitting by topic keeps a
    validation text unseen as a whole, rather than cutting documents in the middle.
    """
    from pydoc_data.topics import topics

    if split not in ("train", "validation"):
        raise BadInput(f"pydoc has splits 'train' and 'validation', not {split!r}")
    names = sorted(topics)
    return [topics[n] for i, n in enumerate(names) if (i % 10 == 5) == (split == "validation")]


def pydoc_tokenizer(cache_dir=None, vocab_size=2048):
    """The byte-level BPE of vocab_size tokens trained on the pydoc train topics, trained once and
    cached (see the module docstring). Returns a tokenizers.Tokenizer; id 0 is <|endoftext|>."""
    train = pydoc_topics("train")
    folder = Path(cache_dir or default_cache_dir()).expanduser() / "pydoc"
    path = folder / f"bpe-{vocab_size}-{sha1(''.join(train))[:12]}" / "tokenizer.json"
    return byte_level_bpe(train, vocab_size, path)


def pydoc_tokens(split, tokenizer, cache_dir=None) -> tuple[np.ndarray, dict]:
    """The token stream of one pydoc split: each topic's ids followed by one <|endoftext|> id.

    Cache: cache_dir/pydoc/<split>-<key>.npy, key = sha1 of (split, text, tokenizer fingerprint).
    Returns (ids, source) with ids a read-only memmap of shape (n_tokens,).
    """
    topics = pydoc_topics(split)
    eos = eos_id(tokenizer)
    if eos is None:
        raise BadInput(f"the tokenizer has neither {EOS} nor an end-of-sequence token, which pydoc puts between topics")
    path = cache_path(cache_dir, "pydoc", split, [split, sha1("\0".join(topics)), tokenizer_fingerprint(tokenizer)])

    def make_ids():
        return [t for ids in encode_lines(tokenizer, topics) for t in ids + [eos]]

    vocab_size = backend(tokenizer).get_vocab_size(with_added_tokens=True)
    return cached_tokens(path, make_ids, vocab_size), {"source": "pydoc_data.topics", "cache": str(path)}
