"""The runner on the language path: GPT-2 presets, the embedded pydoc run, bad input.

WikiText-103 loading and perplexity accumulation are tested in test_data_text.py.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gblr.system.config import ROOT, compose
from gblr.data.text import build_text_data
from gblr.tasks.metrics import unigram_perplexity
from gblr.run.runner import run

EMBEDDED = "experiment=gpt2_tiny_pydoc"
# The paper presets' FLOP reports at commit c5b6a15 (tests/data/paper_presets.py; test_presets.py)
STORED_PRESETS = json.loads((Path(__file__).parent / "data" / "paper_presets.json").read_text())
PAPER = "experiment=gpt2_wikitext103_ft"


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    """No test may reach the network, whatever the environment says."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: a 64-wide model's matmuls gain nothing from more, and on a shared
    machine OpenMP threads spin against other processes (the embedded run took 455 s with 2
    threads under load, 51 s with 1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A local tokenizer directory (the pydoc BPE saved by save_pretrained), standing in for GPT-2's."""
    from transformers import PreTrainedTokenizerFast

    from gblr.data.pydoc_text import pydoc_tokenizer
    from gblr.data.tokenization import EOS

    path = tmp_path_factory.mktemp("tokenizer") / "bpe"
    bpe = pydoc_tokenizer(tmp_path_factory.mktemp("bpe-cache"), vocab_size=300)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------- the presets


def test_presets_compose_with_the_paper_settings():
    paper = compose(PAPER)
    assert (paper.model.name, paper.model.task._target_, paper.data.name) == ("gpt2", "gblr.tasks.CausalLM", "wikitext103")
    assert paper.budget == 7 / 22  # the float nearest 7/22: 43.75% in the paper convention
    assert (paper.data.block_size, paper.data.vocab_size, paper.data.tokenizer) == (1024, 50257, "gpt2")
    t = paper.train
    assert (t.epochs, t.lr, t.structure_lr, t.weight_decay, t.warmup_epochs, t.clip_grad) == (10, 1.5e-3, 1.5e-3, 0.1, 1, 1.0)
    assert t.batch_size == 512 and t.batch_size % t.grad_accum == 0  # global batch 512 x 1024 tokens
    assert list(paper.model.targets) == ["attn.c_attn", "mlp.c_fc", "mlp.c_proj"]
    # The paper's structure per weight type; the other types' keys resolve to null (not passed on).
    expected = {"dense": {}, "lowrank": {"rank": 192}, "monarch": {"nblocks": 4}, "gblr": {"rank_ratio": 0.25, "rank": 1},
                "blast": {"nblocks": 12, "rank": 184}}
    for kind, options in expected.items():
        given = OmegaConf.to_container(compose(PAPER, f"weight={kind}").weight.options, resolve=True)
        paper_keys = {k: v for k, v in given.items() if k in ("rank", "nblocks", "rank_ratio") and v is not None}
        assert paper_keys == options, (kind, given)
    assert compose(PAPER, "weight=lowrank", "weight.options.rank=96").weight.options.rank == 96

    tiny = compose(EMBEDDED)
    assert (tiny.model.name, tiny.data.name, tiny.model.pretrained, tiny.data.tokenizer) == ("gpt2_tiny", "pydoc", None, None)
    assert tiny.data.block_size <= tiny.model.kwargs.n_positions
    assert tiny.weight.kind == "gblr" and tiny.budget == compose().budget  # the default weight type and budget


@pytest.mark.parametrize("weight", ["dense", "lowrank", "monarch", "gblr"])
def test_paper_preset_dry_run_on_random_gpt2_small_is_43_75_percent(tmp_path, weight):
    # nothing downloaded: offline, dry_run builds GPT2Config() randomly initialized and says so
    result = run(compose(PAPER, f"weight={weight}", "dry_run=true", f"out_dir={tmp_path}"))
    assert "random init" in result["weights"] and "HF_HUB_OFFLINE" in result["weights"]
    flops = result["flops"]
    assert flops["tokens"] == 1024 and flops["paper_convention"] is not None
    stored = STORED_PRESETS[f"gpt2_wikitext103_ft/{weight}"].get("flops", {})  # what the preset gave at c5b6a15
    assert {k: flops[k] for k in stored} == stored
    if weight == "dense":
        assert flops["paper"] == 1.0 and flops["replaced"] == 1.0 and result["budget"] == 1.0
        return
    assert flops["paper"] == pytest.approx(0.4375, abs=1e-4)
    assert flops["replaced"] == pytest.approx(7 / 22, abs=1e-9) and flops["replaced"] <= result["budget"]
    layers = result["layers"]
    assert len(layers) == 36 and all(layer["kind"] == weight for layer in layers)
    assert {layer["name"].split(".", 3)[-1] for layer in layers} == {"attn.c_attn", "mlp.c_fc", "mlp.c_proj"}
    assert json.loads((tmp_path / "results.json").read_text())["flops"]["paper"] == flops["paper"]


# ---------------------------------------------------------------------- the embedded language run


@pytest.mark.e2e
def test_embedded_run_beats_unigram_and_gblr_stays_near_the_dense_start(tmp_path, cache_dir):
    cfg = compose(EMBEDDED, f"cache_dir={cache_dir}", f"out_dir={tmp_path}")
    result = run(cfg)
    m = result["metrics"]
    train, val, info = build_text_data("pydoc", cache_dir=cache_dir, vocab_size=cfg.data.vocab_size,
                                       block_size=cfg.data.block_size)
    unigram = unigram_perplexity(train, val, info["vocab_size"])
    assert m["start_ppl"] < 0.5 * unigram, (m, unigram)  # the dense start learned more than token frequencies
    assert m["ppl"] <= 1.15 * m["start_ppl"], m  # GBLR at the default budget, after fine-tuning
    assert result["weight"] == "gblr" and result["budget"] == cfg.budget and result["flops"]["replaced"] <= cfg.budget
    assert m["eval_mode"] == "blocks" and m["eval_tokens"] == m["start_eval_tokens"] > 0
    assert "pydoc" in result["data_description"] and "WikiText" not in result["data_description"]
    assert result["flops"]["paper"] is None  # the paper convention is GPT-2 small only
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metrics"] == pytest.approx(m) and len(saved["history"]) == cfg.train.epochs


@pytest.mark.parametrize("weight", ["dense", "lowrank", "monarch", "gblr"])
def test_every_weight_type_fine_tunes_within_the_budget(tmp_path, cache_dir, weight):
    # one short dense start shared by the four (cached), one epoch of fine-tuning each
    result = run(compose(EMBEDDED, f"weight={weight}", f"cache_dir={cache_dir}", f"out_dir={tmp_path}",
                                "start.epochs=1", "train.epochs=1"))
    m = result["metrics"]
    assert {"ppl", "start_ppl", "converted_ppl"} <= set(m) and all(1 < m[k] < 2 * 2048 for k in ("ppl", "start_ppl"))
    assert result["flops"]["replaced"] <= result["budget"]
    assert len(result["layers"]) == 2 * 3 and all(layer["kind"] == weight for layer in result["layers"])
    if weight == "dense":
        assert result["budget"] == 1.0 and m["converted_ppl"] == pytest.approx(m["start_ppl"])  # logits unchanged


# ------------------------------------------------------------------------------------- bad input


def run_py(tmp_path, *overrides, env=None):
    """`python run.py OVERRIDES` offline, with an empty Hugging Face cache."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), **(env or {})}
    env.pop("GBLR_DEBUG", None)
    command = [sys.executable, "run.py", f"hydra.run.dir={tmp_path / 'run'}", f"out_dir={tmp_path / 'run'}",
               f"cache_dir={tmp_path / 'cache'}", *overrides]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


def assert_one_line_error(done, *fragments):
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0, done.stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_paper_preset_without_data_offline_is_a_one_line_error(tmp_path):
    # the default tokenizer "gpt2" is neither a local directory nor in the (empty) cache
    done = run_py(tmp_path, PAPER)
    assert_one_line_error(done, "data.tokenizer=")
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("case", ["no data offline", "missing root", "block size", "missing tokenizer", "vocabulary"])
def test_bad_text_input_raises_one_line_errors_before_any_model(tmp_path, tokenizer_dir, case):
    """Each case as run() sees it; run.py turns these exceptions into one `error:` line (tested above)."""
    missing = tmp_path / "no" / "such" / "folder"
    overrides, error, fragments = {
        # no data.root, no `datasets` cache offline: says how to point at local files
        "no data offline": ([PAPER, f"data.tokenizer={tokenizer_dir}", "data.vocab_size=300"], FileNotFoundError,
                            ["data.root=", "parquet", "wiki."]),
        "missing root": ([PAPER, f"data.tokenizer={tokenizer_dir}", f"data.root={missing}"], FileNotFoundError,
                         [str(missing), "does not exist", "parquet", "wiki.train.raw"]),
        "block size": ([EMBEDDED, "data.block_size=256"], ValueError, ["block_size=256", "128 positions"]),
        "missing tokenizer": ([PAPER, f"data.tokenizer={missing}"], FileNotFoundError, [str(missing), "data.tokenizer"]),
        # ids the model's embedding does not have would fail deep inside the model
        "vocabulary": ([EMBEDDED, f"data.tokenizer={tokenizer_dir}", "data.vocab_size=256"], ValueError,
                       ["has 300 tokens", "data.vocab_size=256", "set data.vocab_size=300"]),
    }[case]
    with pytest.raises(error) as raised:
        run(compose(*overrides, f"cache_dir={tmp_path}", f"out_dir={tmp_path / 'run'}"))
    message = str(raised.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    assert [p.name for p in (tmp_path / "run").iterdir()] == []  # nothing written, not even the folder's lock


def test_block_size_above_the_context_through_run_py(tmp_path):
    done = run_py(tmp_path, PAPER, "data.block_size=2048")
    assert_one_line_error(done, "block_size=2048", "1024 positions")
