"""WikiText-103 (wikitext-103-raw-v1): where its text comes from, and its token streams.

Sources: a local folder (data.root) in either of two layouts, the hub's parquet files
(<split>-*.parquet) or the original zip's wiki.{train,valid,test}.raw, looked for in the folder
itself, its wikitext-103-raw-v1/ (the hub repo's layout) or its wikitext-103-raw/ (the zip's).
Without data.root: the Hugging Face datasets cache, or the hub when online (the `datasets`
library is imported only then).

Each line is tokenized on its own and the ids are concatenated in file order with NO end-of-text
token added: this is what Hugging Face's run_clm.py does, which is how GPT-2 WikiText-103 numbers
(including the paper's) are usually produced. Whitespace-only lines of the raw files are read as ""
exactly as the hub's rows store them, so both local layouts give the same ids.

Token cache: <cache_dir>/wikitext103/<split>-<key>.npy (see gblr.data.token_stream).
"""

import itertools
import sys
from pathlib import Path

import numpy as np

from gblr.data.token_stream import cache_path, cached_tokens
from gblr.data.tokenization import backend, encode_lines, tokenizer_fingerprint
from gblr.system.hub import hub_offline
from gblr.system.errors import MissingInput

WIKITEXT_CONFIG = "wikitext-103-raw-v1"
WIKITEXT_DESCRIPTION = "WikiText-103 (wikitext-103-raw-v1)"

_RAW_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
# where a downloaded copy usually puts the files: the folder itself, the hub repo's config
# folder (Salesforce/wikitext/wikitext-103-raw-v1/*.parquet), the original zip's folder.
_WIKITEXT_SUBDIRS = ("", WIKITEXT_CONFIG, "wikitext-103-raw")
_LINES_PER_BATCH = 10_000


def _wikitext_local_files(root: Path, split: str):
    """("parquet", [paths]) or ("raw", [path]) for one split under a local WikiText-103 folder."""
    if not root.is_dir():
        raise MissingInput(
            f"data.root={root} does not exist; point data.root at a folder with the hub's "
            f"{WIKITEXT_CONFIG} parquet files ({split}-*.parquet) or the raw files (wiki.train.raw, ...)"
        )
    for sub in _WIKITEXT_SUBDIRS:
        folder = root / sub
        parquet = sorted(folder.glob(f"{split}-*.parquet"))
        if parquet:
            return "parquet", parquet
        if (folder / _RAW_FILES[split]).is_file():
            return "raw", [folder / _RAW_FILES[split]]
    looked = ", ".join(str(root / s) for s in _WIKITEXT_SUBDIRS)
    raise MissingInput(
        f"WikiText-103 split {split!r} not found under data.root={root}: looked for "
        f"{split}-*.parquet and {_RAW_FILES[split]} in {looked}; point data.root at a folder "
        f"holding either layout"
    )


def _read_lines(kind: str, paths) -> list[str]:
    """The rows of a split as the hub stores them: one string per line, "" for blank lines."""
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {paths[0]} needs pyarrow: pip install pyarrow") from None
        return [line for p in paths for line in pq.read_table(p, columns=["text"]).column("text").to_pylist()]
    with open(paths[0], encoding="utf-8") as f:
        return [line if line.strip() else "" for line in f]


def _hub_wikitext(split: str):
    """The split from the Hugging Face datasets cache, or the hub when online."""
    try:
        import datasets
    except ImportError:
        raise MissingInput(
            "WikiText-103: data.root is not set and the `datasets` library is not installed; set "
            f"data.root=/path/to/{WIKITEXT_CONFIG} (parquet or wiki.*.raw files) or pip install datasets"
        ) from None
    errors = []
    for repo in ("Salesforce/wikitext", "wikitext"):  # the canonical id, then the old alias
        try:
            return datasets.load_dataset(repo, WIKITEXT_CONFIG, split=split)
        except Exception as e:  # noqa: BLE001 - any failure means: not reachable, say so below
            errors.append(f"{repo}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise MissingInput(
        f"WikiText-103 split {split!r} is neither in the Hugging Face datasets cache nor reachable "
        f"(HF_HUB_OFFLINE={int(hub_offline())}; {'; '.join(errors)}); set "
        f"data.root=/path/to/{WIKITEXT_CONFIG} with the hub's parquet files or wiki.*.raw files"
    )


def _tokenize_wikitext(tokenizer, lines: list[str], desc: str) -> np.ndarray:
    """Encode line by line (run_clm style) and concatenate; a progress bar only on a terminal."""
    from tqdm import tqdm

    chunks = []
    starts = range(0, len(lines), _LINES_PER_BATCH)
    for start in tqdm(starts, desc=desc, disable=not sys.stderr.isatty(), unit="batch"):
        ids = encode_lines(tokenizer, lines[start : start + _LINES_PER_BATCH])
        chunks.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)


def wikitext_tokens(split, tokenizer, root=None, cache_dir=None) -> tuple[np.ndarray, dict]:
    """The token stream of one WikiText-103 split and a dict saying where it came from.

    split: "train", "validation" or "test". root: a local folder (see _wikitext_local_files) or
    None for the Hugging Face datasets cache / hub.
    Cache: cache_dir/wikitext103/<split>-<key>.npy, key = sha1 of (config, split, source
    fingerprint, tokenizer fingerprint); the source fingerprint is the file names and byte sizes
    for local files (so the folder may move) and the datasets fingerprint for the HF cache.
    Returns (ids, source) with ids a read-only memmap of shape (n_tokens,).
    """
    if root is not None:
        kind, paths = _wikitext_local_files(Path(root).expanduser(), split)
        fingerprint = [[p.name, p.stat().st_size] for p in paths]
        source = {"source": kind, "files": [str(p) for p in paths]}
        get_lines = lambda: _read_lines(kind, paths)  # noqa: E731
    else:
        dataset = _hub_wikitext(split)
        fingerprint = getattr(dataset, "_fingerprint", None) or str(dataset.info.splits)
        source = {"source": "hf-datasets", "files": [f["filename"] for f in dataset.cache_files]}
        get_lines = lambda: list(dataset["text"])  # noqa: E731
    key_parts = [WIKITEXT_CONFIG, split, fingerprint, tokenizer_fingerprint(tokenizer)]
    path = cache_path(cache_dir, "wikitext103", split, key_parts)
    make_ids = lambda: _tokenize_wikitext(tokenizer, get_lines(), f"tokenizing {split}")  # noqa: E731
    ids = cached_tokens(path, make_ids, backend(tokenizer).get_vocab_size(with_added_tokens=True))
    return ids, {**source, "cache": str(path)}
