"""Text data: pydoc split and BPE cache, WikiText-103 local layouts and token cache, perplexity."""

import math

import numpy as np
import pytest
import torch

from gblr.tasks import metrics
from gblr.data import pydoc_text, text, token_stream, tokenization, wikitext

WIKI = {
    "train": [
        "",
        " = Valkyria Chronicles III = \n",
        "",
        " Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video game . \n",
        "",
        " = = Gameplay = = \n",
        " The game 's battle system , the BliTZ system , is carried over directly . \n",
    ],
    "validation": ["", " = Homarus gammarus = \n", "", " Homarus gammarus is a species of clawed lobster . \n"],
    "test": ["", " = Robert Boulter = \n", "", " Robert Boulter is an English film and television actor . \n"],
}
RAW_NAMES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    """No test may reach the network, whatever the environment says."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def gpt2_like_dir(tmp_path_factory):
    """A GPT-2-style tokenizer directory: a tiny byte-level BPE saved by GPT2TokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=[tokenization.EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for lines in WIKI.values() for line in lines] * 5, trainer)
    path = tmp_path_factory.mktemp("tok") / "gpt2-like"
    GPT2TokenizerFast(tokenizer_object=tok, eos_token=tokenization.EOS).save_pretrained(path)
    return path


def write_wikitext(root, layout):
    """The WIKI fixture as the hub's parquet files or the original raw files."""
    if layout == "raw":
        root.mkdir(parents=True)
        for split, lines in WIKI.items():
            # the raw files hold " \n" where the hub stores "" for a blank line
            (root / RAW_NAMES[split]).write_text("".join(line or " \n" for line in lines), encoding="utf-8")
        return
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = root / "wikitext-103-raw-v1" if layout == "parquet-subfolder" else root
    folder.mkdir(parents=True)
    shards = {"train": [WIKI["train"][:3], WIKI["train"][3:]]}  # two shards, as the hub has
    shards.update(validation=[WIKI["validation"]], test=[WIKI["test"]])
    for split, parts in shards.items():
        for i, rows in enumerate(parts):
            pq.write_table(pa.table({"text": rows}), folder / f"{split}-{i:05d}-of-{len(parts):05d}.parquet")


def expected_ids(tokenizer, split):
    """Each line encoded on its own, concatenated, no EOS: run_clm's recipe, computed by hand."""
    return [t for line in WIKI[split] for t in tokenizer(line, add_special_tokens=False).input_ids]


def no_tokenizing(*args):
    raise RuntimeError("tokenized again although the token ids were cached")


# --------------------------------------------------------------------------------------------- pydoc


def test_pydoc_split_is_by_topic_and_deterministic():
    from pydoc_data.topics import topics

    train, val = pydoc_text.pydoc_topics("train"), pydoc_text.pydoc_topics("validation")
    names = sorted(topics)
    assert val == [topics[n] for n in names[5::10]]
    assert len(train) + len(val) == len(topics) and not set(train) & set(val)
    fraction = sum(map(len, val)) / sum(map(len, topics.values()))
    assert 0.03 < fraction < 0.2
    with pytest.raises(ValueError, match="'test'"):
        pydoc_text.pydoc_topics("test")


def test_pydoc_tokenizer_is_trained_once_then_loaded(tmp_path, monkeypatch):
    import tokenizers.trainers

    tok = pydoc_text.pydoc_tokenizer(tmp_path, vocab_size=400)
    assert tok.get_vocab_size() == 400 and tok.token_to_id(tokenization.EOS) == 0
    sample = pydoc_text.pydoc_topics("validation")[0]
    assert tok.decode(tok.encode(sample).ids) == sample  # byte level: lossless on unseen text
    files = list((tmp_path / "pydoc").glob("bpe-400-*/tokenizer.json"))
    assert len(files) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been loaded, not retrained")

    monkeypatch.setattr(tokenizers.trainers, "BpeTrainer", no_training)
    assert pydoc_text.pydoc_tokenizer(tmp_path, vocab_size=400).to_str() == tok.to_str()
    with pytest.raises(ValueError, match="vocab_size=100"):
        pydoc_text.pydoc_tokenizer(tmp_path, vocab_size=100)


def test_pydoc_tokens_eos_after_each_topic_and_cached(tmp_path, monkeypatch):
    train, val, info = text.build_text_data("pydoc", cache_dir=tmp_path, vocab_size=400, block_size=64)
    topics = pydoc_text.pydoc_topics("validation")
    assert isinstance(val, np.memmap) and val.dtype == np.uint16
    assert int((val == info["eos_id"]).sum()) == len(topics) and val[-1] == info["eos_id"]
    assert info["eval_tokens"] == len(val) and info["train_tokens"] == len(train) > 10 * len(val)
    assert "pydoc" in info["description"] and "WikiText" not in info["description"]

    monkeypatch.setattr(pydoc_text, "encode_lines", no_tokenizing)
    train2, val2, _ = text.build_text_data("pydoc", cache_dir=tmp_path, vocab_size=400, block_size=64)
    assert np.array_equal(train2, train) and np.array_equal(val2, val)


# ---------------------------------------------------------------------------------------------- wikitext


@pytest.mark.parametrize("layout", ["raw", "parquet-subfolder", "parquet-direct"])
def test_wikitext_local_layouts_give_run_clm_ids_and_reload_from_cache(tmp_path, monkeypatch, gpt2_like_dir, layout):
    root = tmp_path / "wt103"
    write_wikitext(root, layout)
    tokenizer = tokenization.load_tokenizer(gpt2_like_dir)
    train, val, info = text.build_text_data(
        "wikitext103", root=root, cache_dir=tmp_path / "cache", tokenizer=gpt2_like_dir, block_size=8
    )
    assert train.tolist() == expected_ids(tokenizer, "train")
    assert val.tolist() == expected_ids(tokenizer, "validation")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    assert info["train_source"]["source"] == ("raw" if layout == "raw" else "parquet")
    assert info["vocab_size"] == len(tokenizer) and info["eos_between_documents"] is False
    assert tokenization.EOS not in tokenizer.decode(train.tolist())

    monkeypatch.setattr(wikitext, "encode_lines", no_tokenizing)
    again = text.build_text_data("wikitext103", root=root, cache_dir=tmp_path / "cache", tokenizer=gpt2_like_dir)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    with pytest.raises(RuntimeError, match="tokenized again"):  # the test split was never cached
        text.build_text_data(
            "wikitext103", root=root, cache_dir=tmp_path / "cache", tokenizer=gpt2_like_dir, eval_split="test"
        )


def test_wikitext_cache_key_depends_on_tokenizer(tmp_path, gpt2_like_dir):
    root = tmp_path / "wt103"
    write_wikitext(root, "raw")
    gpt2_like = tokenization.load_tokenizer(gpt2_like_dir)
    pydoc_bpe = pydoc_text.pydoc_tokenizer(tmp_path, vocab_size=300)
    ids_a, src_a = wikitext.wikitext_tokens("validation", gpt2_like, root, tmp_path)
    ids_b, src_b = wikitext.wikitext_tokens("validation", pydoc_bpe, root, tmp_path)
    assert src_a["cache"] != src_b["cache"]
    assert ids_b.tolist() == [t for line in WIKI["validation"] for t in pydoc_bpe.encode(line).ids]


def test_wikitext_errors_name_the_path_and_the_fix(tmp_path, monkeypatch, gpt2_like_dir):
    def build(**kw):
        return text.build_text_data("wikitext103", cache_dir=tmp_path, tokenizer=gpt2_like_dir, **kw)

    with pytest.raises(FileNotFoundError, match=r"data.root=.*nowhere does not exist.*parquet.*wiki\.train\.raw"):
        build(root=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    looked = r"'train' not found.*empty: looked for train-\*\.parquet and wiki\.train\.raw in .*raw-v1"
    with pytest.raises(FileNotFoundError, match=looked):
        build(root=tmp_path / "empty")
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # as if not installed
    with pytest.raises(FileNotFoundError, match="data.root is not set.*datasets.*data.root="):
        build(root=None)
    with pytest.raises(ValueError, match="block_size=2048 exceeds the model's context of 1024"):
        build(root=tmp_path / "nowhere", block_size=2048, max_positions=1024)
    with pytest.raises(ValueError, match="unknown text dataset 'wikitext2'.*pydoc"):
        text.build_text_data("wikitext2")


def test_tokenizer_errors(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    with pytest.raises(FileNotFoundError, match=r"tokenizer directory .*missing does not exist"):
        tokenization.load_tokenizer(tmp_path / "missing")
    hub_error = r"'gblr-test/no-such-tokenizer'.*HF_HUB_OFFLINE=1 is set.*data.tokenizer="
    with pytest.raises(FileNotFoundError, match=hub_error):
        tokenization.load_tokenizer("gblr-test/no-such-tokenizer")
    # what a transformers-5 tokenizer built with the ignored vocab_file=/merges_file= looks like
    empty = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=empty, unk_token="<unk>").save_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="only 1 tokens.*vocab_file="):
        tokenization.load_tokenizer(tmp_path / "empty")


# ---------------------------------------------------------------------------------- blocks, perplexity


def test_token_blocks_are_contiguous_and_drop_the_tail():
    tokens = np.arange(103, dtype=np.uint16)
    blocks = token_stream.TokenBlocks(tokens, block_size=10)
    assert len(blocks) == 10
    item = blocks[9]
    assert item["input_ids"].dtype == torch.int64 and item["input_ids"].tolist() == list(range(90, 100))
    assert torch.equal(item["labels"], item["input_ids"])
    with pytest.raises(IndexError):
        blocks[10]
    with pytest.raises(ValueError, match="fewer than one block"):
        token_stream.TokenBlocks(tokens[:5], block_size=10)


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=37, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    return GPT2LMHeadModel(config).train()  # dropout on: evaluation must switch it off


def token_nll(model, window, first):
    """Sum over local positions t >= first of -log p(window[t] | window[:t]), one position at a time."""
    logits = model.eval()(torch.tensor([window])).logits[0].double()
    return sum(-torch.log_softmax(logits[t - 1], -1)[window[t]].item() for t in range(first, len(window)))


def test_perplexity_blocks_matches_hand_sum_for_any_batch_size(tiny_lm):
    tokens = np.random.default_rng(0).integers(0, 37, size=203).astype(np.uint16)
    bs = 16
    nll = sum(token_nll(tiny_lm, tokens[b : b + bs].tolist(), 1) for b in range(0, 203 - bs + 1, bs))
    tiny_lm.train()
    for batch_size in (1, 3, 5, 100):
        r = metrics.evaluate_perplexity(tiny_lm, tokens, block_size=bs, batch_size=batch_size)
        assert r["tokens"] == 12 * 15 and r["mode"] == "blocks" and r["stride"] is None
        assert r["nll_sum"] == pytest.approx(nll, rel=1e-5)
        assert r["ppl"] == pytest.approx(math.exp(nll / (12 * 15)), rel=1e-5)
        assert tiny_lm.training  # mode restored


def test_perplexity_strided_predicts_each_token_once_with_context(tiny_lm):
    tokens = np.random.default_rng(1).integers(0, 37, size=60).astype(np.uint16)
    bs, stride = 16, 6
    # windows end at 16, 22, ..., 52, 58, then one ending at 60 (moved back to 16 tokens long)
    nll, prev_end = token_nll(tiny_lm, tokens[:bs].tolist(), 1), bs
    while prev_end < 60:
        end = min(prev_end + stride, 60)
        nll += token_nll(tiny_lm, tokens[end - bs : end].tolist(), bs - (end - prev_end))
        prev_end = end
    results = [metrics.evaluate_perplexity(tiny_lm, tokens, bs, batch_size=b, stride=stride) for b in (1, 4, 64)]
    for r in results:
        assert r["tokens"] == 59 and r["mode"] == "strided" and r["stride"] == stride
        assert r["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert results[0]["ppl"] == pytest.approx(results[2]["ppl"], rel=1e-5)
    with pytest.raises(ValueError, match=r"stride=16 must be in \[1, block_size=16\)"):
        metrics.evaluate_perplexity(tiny_lm, tokens, bs, batch_size=1, stride=16)
    with pytest.raises(ValueError, match="only 10 tokens"):
        metrics.evaluate_perplexity(tiny_lm, tokens[:10], bs, batch_size=1)


def test_unigram_perplexity_by_hand():
    train, val = np.array([0, 0, 1]), np.array([0, 2])
    p0, p2 = 3 / 6, 1 / 6  # add-one counts over vocab 3: (3, 2, 1) / 6
    assert metrics.unigram_perplexity(train, val, 3) == pytest.approx(math.exp(-(math.log(p0) + math.log(p2)) / 2))
    uniform = np.tile(np.arange(7), 5)
    assert metrics.unigram_perplexity(uniform, uniform, 7) == pytest.approx(7.0)


def test_a_trained_bigram_lm_beats_the_unigram_baseline_on_pydoc(tmp_path):
    train, val, info = text.build_text_data("pydoc", cache_dir=tmp_path, vocab_size=384, block_size=64)
    torch.manual_seed(0)
    model = torch.nn.Embedding(info["vocab_size"], info["vocab_size"])  # logits of the next token: a bigram LM
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    blocks = torch.utils.data.DataLoader(token_stream.TokenBlocks(train, 64), batch_size=64, shuffle=True)
    for batch in blocks:
        ids = batch["input_ids"]
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    ppl = metrics.evaluate_perplexity(model, val, 64, batch_size=64)["ppl"]  # plain-tensor output works too
    assert ppl < 0.5 * metrics.unigram_perplexity(train, val, info["vocab_size"])  # about 26 vs 122
