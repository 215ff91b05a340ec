"""Tokenizers: a Hugging Face tokenizer from a folder or hub name, a locally trained byte-level BPE,
and the fingerprint that keys every token cache.

Encoding goes through the `tokenizers` backend (`backend`), so a Hugging Face fast tokenizer and a
bare tokenizers.Tokenizer (the locally trained BPE) are used the same way. The fingerprint hashes
the tokenizer's full json, so a cache made with one tokenizer is never read with another.
"""

from pathlib import Path

from gblr.data.token_stream import sha1
from gblr.system.hub import hub_offline
from gblr.system.files import cached
from gblr.system.errors import BadInput, MissingInput

EOS = "<|endoftext|>"


def load_tokenizer(name_or_path="gpt2"):
    """A Hugging Face tokenizer from a local directory or, when online, a hub name (e.g. "gpt2").

    Uses AutoTokenizer.from_pretrained: in transformers 5 the vocab_file=/merges_file= keyword
    arguments are silently ignored and give an empty tokenizer.
    """
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
    if not path.is_dir() and (path.is_absolute() or str(name_or_path).startswith((".", "~"))):
        raise MissingInput(
            f"tokenizer directory {path} does not exist; set data.tokenizer to a folder with "
            "tokenizer.json (or vocab.json + merges.txt), e.g. one written by save_pretrained"
        )
    # A hub name: the library reads the Hugging Face cache, and downloads only when the hub is allowed.
    why = "HF_HUB_OFFLINE=1 is set" if not path.is_dir() and hub_offline() else None
    try:
        source = str(path) if path.is_dir() else name_or_path
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=bool(why))
    except Exception as e:
        if path.is_dir():  # a truncated or foreign tokenizer.json: name the folder, not the parser's line
            raise BadInput(f"data.tokenizer folder {path} cannot be read as a tokenizer "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
        if not isinstance(e, OSError):
            raise
        raise MissingInput(
            f"tokenizer {name_or_path!r} is not a local directory and could not be loaded from the "
            f"Hugging Face cache or hub ({why or str(e).splitlines()[0]}); fetch it once with "
            f"`hf download {name_or_path}`, or set data.tokenizer=/path/to/gpt2 (a folder with "
            "tokenizer.json or vocab.json + merges.txt)"
        ) from None
    if len(tokenizer) < 256:
        raise BadInput(
            f"tokenizer {name_or_path!r} has only {len(tokenizer)} tokens; a GPT-2 byte-level BPE has "
            "at least 256 (was it built with vocab_file=/merges_file=, which transformers 5 ignores?)"
        )
    return tokenizer


def byte_level_bpe(texts: list[str], vocab_size: int, path: Path):
    """A byte-level BPE of vocab_size tokens trained on texts; trained once, then loaded from path.

    path is the tokenizer.json to write (the `tokenizers` library's own format), a checksummed cache
    entry (``gblr.system.files.cached``). Id 0 is <|endoftext|>; the 256 byte symbols are always in the vocabulary, so
    any text encodes without unknown tokens. Returns a tokenizers.Tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise BadInput(f"vocab_size={vocab_size} is too small: a byte-level BPE needs 256 bytes + {EOS}")

    def train(tmp):
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer)
        tokenizer.save(tmp)

    return cached(path, [vocab_size, sha1("\0".join(texts))], train, lambda p: Tokenizer.from_file(str(p)))


def backend(tokenizer):
    """The tokenizers.Tokenizer under a Hugging Face fast tokenizer (or the object itself)."""
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def eos_id(tokenizer) -> int | None:
    """The id of the document separator: <|endoftext|> (GPT-2's, the local BPE's), else the
    tokenizer's own end-of-sequence token (Llama's </s>), else None."""
    found = backend(tokenizer).token_to_id(EOS)
    return found if found is not None else getattr(tokenizer, "eos_token_id", None)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha1 (16 hex) of the tokenizer's full json: vocab, merges, normalizer, special tokens."""
    return sha1(backend(tokenizer).to_str())[:16]


def encode_lines(tokenizer, lines: list[str]) -> list[list[int]]:
    """Token ids of each line on its own, no special tokens added."""
    return [e.ids for e in backend(tokenizer).encode_batch_fast(lines, add_special_tokens=False)]
