"""Language-modelling data: one call, `build_text_data`, gives a dataset's train and eval token
streams and what they are.

The datasets live in their own modules: "wikitext103" (gblr.data.wikitext, WikiText-103 with the
GPT-2 tokenizer) and "pydoc" (gblr.data.pydoc_text, an embedded offline corpus with a locally
trained BPE). Tokenizers are in gblr.data.tokenization, the on-disk token cache and training
blocks in gblr.data.token_stream; perplexity is in gblr.tasks.metrics.
"""

import sys

from gblr.data.pydoc_text import PYDOC_DESCRIPTION, pydoc_tokenizer, pydoc_tokens
from gblr.data.tokenization import backend, eos_id, load_tokenizer, tokenizer_fingerprint
from gblr.data.wikitext import WIKITEXT_DESCRIPTION, wikitext_tokens
from gblr.system.errors import BadInput

TEXT_DATASETS = ("pydoc", "wikitext103")


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
        raise BadInput(f"unknown text dataset {name!r}; choose one of {TEXT_DATASETS}")
    if max_positions is not None and block_size > max_positions:
        raise BadInput(f"block_size={block_size} exceeds the model's context of {max_positions} positions")
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
    tok_backend = backend(tok)
    info = {
        "name": name,
        "description": description,
        "tokenizer": tokenizer or ("gpt2" if name == "wikitext103" else f"pydoc byte-level BPE {vocab_size}"),
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "vocab_size": tok_backend.get_vocab_size(with_added_tokens=True),
        "eos_id": eos_id(tok),
        "eos_between_documents": name == "pydoc",
        "block_size": block_size,
        "eval_split": eval_split,
        "train_tokens": int(len(train)),
        "eval_tokens": int(len(evaluation)),
        "train_source": train_src,
        "eval_source": eval_src,
    }
    return train, evaluation, info
