"""Any model: tiny random models of several Hugging Face causal-LM and timm architectures, saved as a
user's folder, run through the runner (model=causal_lm / model=timm) with every weight type.

For each architecture: every weight type converts at budget 0.3 with flops.replaced <= 0.3; the generic
MAC count equals the analytic one where the family has one; one fine-tune epoch on the embedded data
runs; the export reloads to the same metric.
"""
import json

import pytest
import timm
import torch
import transformers
from timm.models import register_model, save_for_hf

import gblr
from gblr.layers import LAYERS
from gblr.run.runner import run
from gblr.structure.macs import count_macs
from gblr.structure.surgery import default_targets, target_layers
from gblr.system.config import compose
from gblr.tasks.language import gpt2_macs
from gblr.tasks.vision import vit_macs

KINDS = sorted(kind for kind in LAYERS if kind != "dense")
TINY = dict(vocab_size=2048, max_position_embeddings=128)
LANGUAGE = {  # (config class, model class, config): 2 blocks, 32 wide
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=2048, n_positions=128, n_embd=32, n_layer=2, n_head=2)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(TINY, hidden_size=32, num_hidden_layers=2,
                                                              num_attention_heads=4, intermediate_size=64)),
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", dict(TINY, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                          num_key_value_heads=2, intermediate_size=64,
                                                          tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(TINY, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=1, intermediate_size=64, tie_word_embeddings=True)),
}
SMALL_VIT = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
VISION = {  # (timm name, create_model arguments)
    "vit": ("vit_base_patch16_224", SMALL_VIT),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", SMALL_VIT),  # two heads, two prefix tokens
    "mixer": ("mixer_test_tiny", {}),
}
ARCHITECTURES = [*LANGUAGE, *VISION]
# One fine-tune epoch of few steps: the embedded data in large batches.
EPOCH = ["train.epochs=1", "train.batch_size=256", "train.eval_batch_size=256", "train.warmup_epochs=0"]


@register_model
def mixer_test_tiny(pretrained=False, **kwargs):
    """timm's MlpMixer at test size (timm's named Mixers fix their width and depth): 32 px, patches of
    4 (64 tokens), 2 blocks, 32 wide."""
    from timm.models.mlp_mixer import MlpMixer
    from timm.models._builder import build_model_with_cfg

    args = {**dict(img_size=32, patch_size=4, num_blocks=2, embed_dim=32), **kwargs}
    model = build_model_with_cfg(MlpMixer, "mixer_s16_224", pretrained, **args)
    model.pretrained_cfg["architecture"] = "mixer_test_tiny"  # what a saved folder and an export name
    return model


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{architecture: a folder as a user has it}: save_pretrained for the LMs (the Llama one with its own
    tokenizer, the pydoc BPE), timm's save_for_hf for the vision models."""
    from transformers import PreTrainedTokenizerFast

    from gblr.data.pydoc_text import pydoc_tokenizer
    from gblr.data.tokenization import EOS

    root, found = tmp_path_factory.mktemp("models"), {}
    for name, (config_class, model_class, config) in LANGUAGE.items():
        torch.manual_seed(0)
        model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
        model.save_pretrained(root / name)
        found[name] = root / name
    bpe = pydoc_tokenizer(tmp_path_factory.mktemp("bpe"), vocab_size=2048)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS).save_pretrained(root / "llama_gqa")
    for name, (arch, args) in VISION.items():
        torch.manual_seed(0)
        model = timm.create_model(arch, num_classes=10, **args)
        save_for_hf(model, root / name, model_args=args, safe_serialization=True)
        found[name] = root / name
    return found


def overrides(name: str, folder) -> list[str]:
    if name in LANGUAGE:
        return ["model=causal_lm", f"model.pretrained={folder}", f"model.name=tiny_{name}", "data=pydoc"]
    return ["model=timm", f"model.name={VISION[name][0]}", f"model.pretrained={folder}", "data=digits"]


def build(name: str, folder):
    cfg = compose(*overrides(name, folder))
    return gblr.tasks.build_task(cfg, "cpu").build_model(allow_random_fallback=False)[0]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_default_targets_are_every_linear_layer_but_the_head(name, folders):
    model = build(name, folders[name])
    names = [layer for layer, _ in target_layers(model, default_targets(model))]
    assert names and not any(part in layer for layer in names for part in ("lm_head", "head", "embed_out"))
    if name == "llama_gqa":  # grouped-query attention: k and v narrower than q
        q, k = (model.get_submodule(f"model.layers.0.self_attn.{p}_proj") for p in "qk")
        assert k.out_features == q.out_features // 2
    if name in ("vit", "deit_distilled"):  # timm's fused qkv split into three
        assert {"blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v"} <= set(names)


@pytest.mark.parametrize("name", ["gpt2", "vit", "deit_distilled"])
def test_the_generic_count_equals_the_analytic_one(name, folders):
    model = build(name, folders[name])
    gblr.replace_layers(model, None, "lowrank", 0.3)
    analytic = gpt2_macs(model, 64) if name == "gpt2" else vit_macs(model)
    generic = count_macs(model, 64 if name == "gpt2" else None)
    keys = ("macs", "dense_macs", "replaced_macs", "replaced_dense_macs", "tokens")
    assert {k: generic[k] for k in keys} == {k: analytic[k] for k in keys}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_weight_type_converts_within_the_budget(name, kind, folders, tmp_path, cache_dir):
    result = run(compose(*overrides(name, folders[name]), f"weight={kind}", "budget=0.3", "train.epochs=0",
                         "train.eval_batch_size=256", f"cache_dir={cache_dir}", f"out_dir={tmp_path}"))
    assert result["flops"]["replaced"] <= 0.3 and result["flops"]["model"] < 1
    assert result["flops"]["macs"] == count_macs(gblr.load(tmp_path), result["flops"]["tokens"] if name in LANGUAGE
                                                 else None)["macs"]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_one_fine_tune_epoch_and_the_export_gives_the_same_metric(name, folders, tmp_path, cache_dir):
    kind = KINDS[ARCHITECTURES.index(name) % len(KINDS)]  # every weight type fine-tunes on some architecture
    result = run(compose(*overrides(name, folders[name]), f"weight={kind}", "budget=0.3", *EPOCH,
                         f"cache_dir={cache_dir}", f"out_dir={tmp_path}"))
    assert len(result["history"]) == 1  # one epoch's record
    metric = result["metric"]
    assert gblr.evaluate(tmp_path)[metric] == pytest.approx(result["metrics"][metric], rel=1e-5)
    record = json.loads((tmp_path / "model.json").read_text())["model"]
    assert record["library"] == ("transformers" if name in LANGUAGE else "timm")


def test_a_causal_lm_uses_its_own_tokenizer_and_generates_after_export(folders, tmp_path, cache_dir):
    folder = folders["llama_gqa"]
    result = run(compose(*overrides("llama_gqa", folder), "weight=gblr", "budget=0.3", "train.epochs=0",
                         "train.eval_batch_size=256", f"cache_dir={cache_dir}", f"out_dir={tmp_path}"))
    assert result["metrics"]["ppl"] > 1
    assert json.loads((tmp_path / "model.json").read_text())["data"]["tokenizer"] == str(folder)
    model = gblr.load(tmp_path)
    assert isinstance(model, transformers.PreTrainedModel)
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_a_tokenizer_larger_than_the_models_vocabulary_is_one_error(folders, tmp_path, cache_dir):
    with pytest.raises(ValueError, match="has 4096 tokens but the model has 2048 embedding rows"):
        run(compose(*overrides("gpt2", folders["gpt2"]), "data.vocab_size=4096", f"cache_dir={cache_dir}",
                    f"out_dir={tmp_path}"))


def test_a_causal_lm_needs_a_folder_or_hub_name(tmp_path):
    with pytest.raises(ValueError, match="pretrained"):
        run(compose("model=causal_lm", "data=pydoc", f"out_dir={tmp_path}"))
