"""Language-modelling data: WikiText-103 with the GPT-2 tokenizer, and an embedded offline corpus.

Both datasets become one long stream of token ids per split, cached on disk as a .npy file and
re-opened memory-mapped (np.load(mmap_mode="r")), so tokenizing happens once per dataset, split,
source and tokenizer. `TokenBlocks` cuts a stream into training blocks; `evaluate_perplexity`
scores a causal LM on a stream (SPEC §7).

- "wikitext103": wikitext-103-raw-v1 from a local folder (the hub's parquet files or the original
  wiki.*.raw files), else the Hugging Face datasets cache / hub (the `datasets` library is
  imported only then). Each line is tokenized on its own and the ids are concatenated in file
  order with NO end-of-text token added: this is what Hugging Face's run_clm.py does, which is
  how GPT-2 WikiText-103 numbers (including the paper's) are usually produced. Whitespace-only
  lines of the raw files are read as "" exactly as the hub's rows store them, so both local
  layouts give the same ids.
- "pydoc": CPython's own `pydoc_data.topics` (about 465k characters of English reference prose,
  79 topics; the exact text depends on the Python version, which is part of the cache key). Split
  by topic, a byte-level BPE is trained on the train topics only, and one <|endoftext|> id is
  appended after every topic (the topics are independent documents). It is named for what it is:
  no number computed on it is a WikiText result.
"""

import hashlib
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gblr import distributed
from gblr.data import default_cache_dir

WIKITEXT_CONFIG = "wikitext-103-raw-v1"
WIKITEXT_DESCRIPTION = "WikiText-103 (wikitext-103-raw-v1)"
PYDOC_DESCRIPTION = "pydoc_data.topics (CPython reference text)"
EOS = "<|endoftext|>"
TEXT_DATASETS = ("pydoc", "wikitext103")

_RAW_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
# where a downloaded copy usually puts the files: the folder itself, the hub repo's config
# folder (Salesforce/wikitext/wikitext-103-raw-v1/*.parquet), the original zip's folder.
_WIKITEXT_SUBDIRS = ("", WIKITEXT_CONFIG, "wikitext-103-raw")
_LINES_PER_BATCH = 10_000



def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# pydoc: the embedded corpus


def pydoc_topics(split: str) -> list[str]:
    """The pydoc topic texts of one split, in sorted topic-name order.

    Topics are sorted by name; topic i goes to "validation" when i % 10 == 5, else to "train"
    (8 of 79 topics, about 8% of the characters, on CPython 3.11). Splitting by topic keeps a
    validation text unseen as a whole, rather than cutting documents in the middle.
    """
    from pydoc_data.topics import topics

    if split not in ("train", "validation"):
        raise ValueError(f"pydoc has splits 'train' and 'validation', not {split!r}")
    names = sorted(topics)
    return [topics[n] for i, n in enumerate(names) if (i % 10 == 5) == (split == "validation")]


def pydoc_tokenizer(cache_dir=None, vocab_size=2048):
    """A byte-level BPE trained on the pydoc train topics; trained once, cached as tokenizer.json.

    Cache: cache_dir/pydoc/bpe-<vocab_size>-<sha1 of the train text, 12 hex>/tokenizer.json
    (the `tokenizers` library's own format). Id 0 is <|endoftext|>; the 256 byte symbols are
    always in the vocabulary, so any text encodes without unknown tokens. Returns a
    tokenizers.Tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs 256 bytes + {EOS}")
    train = pydoc_topics("train")
    folder = Path(cache_dir or default_cache_dir()).expanduser() / "pydoc"
    path = folder / f"bpe-{vocab_size}-{_sha1(''.join(train))[:12]}" / "tokenizer.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(train, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)
    return tokenizer


# ---------------------------------------------------------------------------------------------
# WikiText-103: where the text comes from


def _wikitext_local_files(root: Path, split: str):
    """("parquet", [paths]) or ("raw", [path]) for one split under a local WikiText-103 folder."""
    if not root.is_dir():
        raise FileNotFoundError(
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
    raise FileNotFoundError(
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
        raise FileNotFoundError(
            "WikiText-103: data.root is not set and the `datasets` library is not installed; set "
            f"data.root=/path/to/{WIKITEXT_CONFIG} (parquet or wiki.*.raw files) or pip install datasets"
        ) from None
    from gblr.hub import hub_offline, hub_reachable

    if not hub_offline() and not hub_reachable():
        raise FileNotFoundError(
            "WikiText-103: data.root is not set and the Hugging Face hub cannot be reached; set "
            f"data.root=/path/to/{WIKITEXT_CONFIG} (parquet or wiki.*.raw files), or HF_HUB_OFFLINE=1 "
            "to read the Hugging Face datasets cache"
        )
    errors = []
    for repo in ("Salesforce/wikitext", "wikitext"):  # the canonical id, then the old alias
        try:
            return datasets.load_dataset(repo, WIKITEXT_CONFIG, split=split)
        except Exception as e:  # noqa: BLE001 - any failure means: not reachable, say so below
            errors.append(f"{repo}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise FileNotFoundError(
        f"WikiText-103 split {split!r} is neither in the Hugging Face datasets cache nor reachable "
        f"(HF_HUB_OFFLINE={int(hub_offline())}; {'; '.join(errors)}); set "
        f"data.root=/path/to/{WIKITEXT_CONFIG} with the hub's parquet files or wiki.*.raw files"
    )


# ---------------------------------------------------------------------------------------------
# tokenizers and the token cache


def load_tokenizer(name_or_path="gpt2"):
    """A Hugging Face tokenizer from a local directory or, when online, a hub name (e.g. "gpt2").

    Uses AutoTokenizer.from_pretrained: in transformers 5 the vocab_file=/merges_file= keyword
    arguments are silently ignored and give an empty tokenizer (SPEC §9).
    """
    from transformers import AutoTokenizer

    from gblr.hub import hub_offline, hub_reachable

    path = Path(name_or_path).expanduser()
    if not path.is_dir() and (path.is_absolute() or str(name_or_path).startswith((".", "~"))):
        raise FileNotFoundError(
            f"tokenizer directory {path} does not exist; set data.tokenizer to a folder with "
            "tokenizer.json (or vocab.json + merges.txt), e.g. one written by save_pretrained"
        )
    why = None
    if not path.is_dir():  # a hub name: read the local HF cache only when the hub is off or unreachable
        why = "HF_HUB_OFFLINE=1 is set" if hub_offline() else None
        if why is None and not hub_reachable():
            why = "the Hugging Face hub cannot be reached"
    try:
        source = str(path) if path.is_dir() else name_or_path
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=bool(why))
    except OSError as e:
        raise FileNotFoundError(
            f"tokenizer {name_or_path!r} is not a local directory and could not be loaded from the "
            f"Hugging Face cache or hub ({why or str(e).splitlines()[0]}); set "
            "data.tokenizer=/path/to/gpt2 (a folder with tokenizer.json or vocab.json + merges.txt)"
        ) from None
    if len(tokenizer) < 256:
        raise ValueError(
            f"tokenizer {name_or_path!r} has only {len(tokenizer)} tokens; a GPT-2 byte-level BPE has "
            "at least 256 (was it built with vocab_file=/merges_file=, which transformers 5 ignores?)"
        )
    return tokenizer


def _backend(tokenizer):
    """The tokenizers.Tokenizer under a Hugging Face fast tokenizer (or the object itself)."""
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha1 (16 hex) of the tokenizer's full json: vocab, merges, normalizer, special tokens."""
    return _sha1(_backend(tokenizer).to_str())[:16]


def _encode_lines(tokenizer, lines: list[str]) -> list[list[int]]:
    """Token ids of each line on its own, no special tokens added."""
    return [e.ids for e in _backend(tokenizer).encode_batch_fast(lines, add_special_tokens=False)]


def _cached_tokens(path: Path, make_ids, vocab_size: int) -> np.ndarray:
    """The token stream at path (.npy), memory-mapped; make_ids() -> 1-D int array builds it once.

    dtype is uint16 when vocab_size <= 65536, else uint32. Written to a temporary file and renamed,
    so a crash never leaves a truncated cache that a later run would trust.
    """
    if not path.is_file():
        dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
        ids = np.asarray(make_ids())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npy")
        np.save(tmp, ids.astype(dtype))
        os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def _tokenize_wikitext(tokenizer, lines: list[str], desc: str) -> np.ndarray:
    """Encode line by line (run_clm style) and concatenate; a progress bar only on a terminal."""
    from tqdm import tqdm

    chunks = []
    starts = range(0, len(lines), _LINES_PER_BATCH)
    for start in tqdm(starts, desc=desc, disable=not sys.stderr.isatty(), unit="batch"):
        ids = _encode_lines(tokenizer, lines[start : start + _LINES_PER_BATCH])
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
    key = _sha1(json.dumps([WIKITEXT_CONFIG, split, fingerprint, tokenizer_fingerprint(tokenizer)]))[:16]
    path = Path(cache_dir or default_cache_dir()).expanduser() / "wikitext103" / f"{split}-{key}.npy"
    make_ids = lambda: _tokenize_wikitext(tokenizer, get_lines(), f"tokenizing {split}")  # noqa: E731
    ids = _cached_tokens(path, make_ids, _backend(tokenizer).get_vocab_size(with_added_tokens=True))
    return ids, {**source, "cache": str(path)}


def pydoc_tokens(split, tokenizer, cache_dir=None) -> tuple[np.ndarray, dict]:
    """The token stream of one pydoc split: each topic's ids followed by one <|endoftext|> id.

    Cache: cache_dir/pydoc/<split>-<key>.npy, key = sha1 of (split, text, tokenizer fingerprint).
    """
    topics = pydoc_topics(split)
    eos = _backend(tokenizer).token_to_id(EOS)
    if eos is None:
        raise ValueError(f"the tokenizer has no {EOS} token, which pydoc puts between topics")
    key = _sha1(json.dumps([split, _sha1("\0".join(topics)), tokenizer_fingerprint(tokenizer)]))[:16]
    path = Path(cache_dir or default_cache_dir()).expanduser() / "pydoc" / f"{split}-{key}.npy"

    def make_ids():
        return [t for ids in _encode_lines(tokenizer, topics) for t in ids + [eos]]

    vocab_size = _backend(tokenizer).get_vocab_size(with_added_tokens=True)
    return _cached_tokens(path, make_ids, vocab_size), {"source": "pydoc_data.topics", "cache": str(path)}


def build_text_data(
    name,
    root=None,
    cache_dir=None,
    tokenizer=None,
    block_size=1024,
    vocab_size=2048,
    max_positions=None,
    eval_split="validation",
):
    """(train_tokens, eval_tokens, info) for name in TEXT_DATASETS.

    tokenizer: a local directory or hub name for AutoTokenizer; None -> "gpt2" for wikitext103
    and a locally trained byte-level BPE of vocab_size tokens for pydoc.
    block_size: tokens per training block; max_positions: the model's context length, checked.
    eval_split: "validation" (or "test", WikiText-103 only).
    Tokens are 1-D read-only memmaps of token ids (uint16 or uint32).
    info (JSON-serializable): name, description, tokenizer, tokenizer_fingerprint, vocab_size
    (the model's embedding size must be at least this), eos_id, block_size, eval_split,
    train_tokens, eval_tokens, eos_between_documents, and each split's source and cache file.
    """
    if name not in TEXT_DATASETS:
        raise ValueError(f"unknown text dataset {name!r}; choose one of {TEXT_DATASETS}")
    if max_positions is not None and block_size > max_positions:
        raise ValueError(f"block_size={block_size} exceeds the model's context of {max_positions} positions")
    if name == "pydoc":
        tok = pydoc_tokenizer(cache_dir, vocab_size) if tokenizer is None else load_tokenizer(tokenizer)
        train, train_src = pydoc_tokens("train", tok, cache_dir)
        evaluation, eval_src = pydoc_tokens(eval_split, tok, cache_dir)
        description = f"{PYDOC_DESCRIPTION}, Python {sys.version.split()[0]}"
    else:
        tok = load_tokenizer(tokenizer or "gpt2")
        train, train_src = wikitext_tokens("train", tok, root, cache_dir)
        evaluation, eval_src = wikitext_tokens(eval_split, tok, root, cache_dir)
        description = WIKITEXT_DESCRIPTION
    backend = _backend(tok)
    info = {
        "name": name,
        "description": description,
        "tokenizer": tokenizer or ("gpt2" if name == "wikitext103" else f"pydoc byte-level BPE {vocab_size}"),
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "vocab_size": backend.get_vocab_size(with_added_tokens=True),
        "eos_id": backend.token_to_id(EOS),
        "eos_between_documents": name == "pydoc",
        "block_size": block_size,
        "eval_split": eval_split,
        "train_tokens": int(len(train)),
        "eval_tokens": int(len(evaluation)),
        "train_source": train_src,
        "eval_source": eval_src,
    }
    return train, evaluation, info


# ---------------------------------------------------------------------------------------------
# blocks and perplexity


class TokenBlocks(torch.utils.data.Dataset):
    """Non-overlapping blocks of a token stream: item i covers tokens[i*block_size : (i+1)*block_size].

    Items are {"input_ids": int64 (block_size,), "labels": the same ids}: the model shifts the
    labels itself (Hugging Face convention). The ragged tail, len(tokens) % block_size tokens, is
    dropped.
    """

    def __init__(self, tokens, block_size: int):
        if len(tokens) < block_size:
            raise ValueError(f"only {len(tokens)} tokens, fewer than one block of block_size={block_size}")
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


def _eval_windows(n_tokens: int, block_size: int, stride):
    """[(begin, first_target)]: windows tokens[begin : begin+block_size] predicting positions
    first_target .. begin+block_size-1 (absolute token indices)."""
    if stride is None:
        return [(b, b + 1) for b in range(0, n_tokens - block_size + 1, block_size)]
    windows, end = [(0, 1)], block_size
    while end < n_tokens:
        new_end = min(end + stride, n_tokens)
        windows.append((new_end - block_size, end))
        end = new_end
    return windows


@torch.no_grad()
def evaluate_perplexity(model, tokens, block_size, batch_size, stride=None, device="cpu") -> dict:
    """Perplexity of a causal LM on a token stream: exp(sum of token NLL / number of predicted tokens).

    The sum runs over the whole stream, never a mean of batch means, so the result does not depend
    on batch_size. model(input_ids) must return logits (batch, length, vocab), or an object with
    .logits (Hugging Face).
    stride=None ("blocks"): non-overlapping windows of block_size tokens, the ragged tail dropped,
    each predicting its block_size - 1 last tokens from the ones before (what training sees).
    stride=int ("strided", HF style): windows of block_size tokens moving by stride; the first
    window predicts its tokens 1..block_size-1 and every later window only its last `stride` new
    tokens, with the rest as context; every token after the first is predicted exactly once.
    Unlike Hugging Face's loop, the last window is moved back to end at the last token, so it is
    a full block_size long and its new tokens keep at least block_size - stride of context.
    Returns {"ppl", "nll_sum" (nats), "tokens" (count predicted), "mode", "stride", "block_size"}.
    """
    n = len(tokens)
    if block_size < 2:
        raise ValueError(f"block_size={block_size}: a window needs at least 2 tokens to predict one")
    if n < block_size:
        raise ValueError(f"only {n} tokens, fewer than one window of block_size={block_size}")
    if stride is not None and not 1 <= stride < block_size:
        raise ValueError(
            f"stride={stride} must be in [1, block_size={block_size}); use stride=None for non-overlapping blocks"
        )
    windows = _eval_windows(n, block_size, stride)[distributed.rank()::distributed.world_size()]
    was_training = model.training
    model.eval()
    nll_sum, count = 0.0, 0
    positions = torch.arange(1, block_size, device=device)  # window-local index of each target
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        ids = torch.from_numpy(np.stack([np.asarray(tokens[b : b + block_size], dtype=np.int64) for b, _ in batch]))
        ids = ids.to(device)
        out = model(ids)
        logits = getattr(out, "logits", out)[:, :-1].float()  # position t predicts token t+1
        targets = ids[:, 1:].clone()
        first = torch.tensor([f - b for b, f in batch], device=device)
        targets[positions[None, :] < first[:, None]] = -100  # context, already predicted earlier
        nll_sum += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += int((targets != -100).sum())
    model.train(was_training)
    nll_sum, count = distributed.all_sum(nll_sum, count)  # under torchrun each rank scored a share
    count = int(count)
    return {
        "ppl": float(np.exp(nll_sum / count)),
        "nll_sum": nll_sum,
        "tokens": count,
        "mode": "blocks" if stride is None else "strided",
        "stride": stride,
        "block_size": block_size,
    }


def unigram_perplexity(train_tokens, val_tokens, vocab_size: int) -> float:
    """Perplexity on val_tokens of an add-one smoothed unigram model counted on train_tokens.

    p(v) = (count_train(v) + 1) / (len(train_tokens) + vocab_size); every val token is scored.
    A language model that does not beat this has learned nothing beyond token frequencies.
    """
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size).astype(np.float64) + 1.0
    if counts.size > vocab_size:
        raise ValueError(f"train_tokens has id {counts.size - 1} >= vocab_size={vocab_size}")
    log_p = np.log(counts / counts.sum())
    return float(np.exp(-log_p[np.asarray(val_tokens)].mean()))
