"""Pretrained weights as users have them: a warm Hugging Face cache on an offline machine, loaded by
hub name and by folder through the runner, and the one error when they are missing."""
import logging

import pytest
import torch

from gblr.run import runner
from gblr.system.config import compose
from gblr.system.hub import WeightsNotFound
from gblr.tasks.language import GPT2_TINY
from gblr.tasks.vision import VIT_ARCH, VIT_TINY


@pytest.fixture
def seen_by_surgery(monkeypatch):
    """The dense model's state at the moment the runner prepares its conversion (what it loaded),
    before the surgery splits timm's fused qkv."""
    seen = {}
    prepare = runner.layer_options

    def spy(cfg, task, model, *args, **kwargs):
        seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return prepare(cfg, task, model, *args, **kwargs)

    monkeypatch.setattr(runner, "layer_options", spy)
    return seen


def tiny_vit_folder(path):
    """A tiny ViT in timm's hub layout (config.json + model.safetensors), as timm.models.save_for_hf writes it."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(123)
    model = timm.create_model(VIT_ARCH, **VIT_TINY)
    save_for_hf(model, path, safe_serialization=True)
    return model.state_dict()


def tiny_gpt2_folder(path):
    """A tiny GPT-2 for the pydoc data (2048 tokens) written by save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(123)
    model = GPT2LMHeadModel(GPT2Config(**GPT2_TINY, vocab_size=2048, bos_token_id=None, eos_token_id=None))
    model.save_pretrained(path)
    return model.state_dict()


CASES = {"vit": (tiny_vit_folder, ["model=vit_tiny"]), "gpt2": (tiny_gpt2_folder, ["experiment=gpt2_tiny_pydoc"])}


@pytest.mark.parametrize("how", ["hub name", "folder"])
@pytest.mark.parametrize("family", ["vit", "gpt2"])
def test_runner_loads_weights_from_an_offline_cache_and_from_a_folder(hf_cache, tmp_path, seen_by_surgery, family, how):
    save, overrides = CASES[family]
    saved = save(tmp_path / "weights")
    hf_cache("someone/tiny-model", tmp_path / "weights")
    pretrained = "someone/tiny-model" if how == "hub name" else str(tmp_path / "weights")
    result = runner.run(compose(*overrides, f"model.pretrained={pretrained}", "dry_run=true", f"out_dir={tmp_path / 'run'}"))
    assert result["weights"] == ("hub " if how == "hub name" else "local folder ") + pretrained
    assert seen_by_surgery.keys() >= saved.keys() - {"lm_head.weight"}
    for key, value in saved.items():  # every tensor as saved: not a random init
        if key in seen_by_surgery:
            assert torch.equal(seen_by_surgery[key], value), key


def test_missing_hub_weights_stop_a_run_and_a_dry_run_says_random(hf_cache, tmp_path, cache_dir, caplog):
    with pytest.raises(WeightsNotFound, match=r"'someone/absent' are not in the Hugging Face cache.*`hf download someone/absent`"):
        runner.run(compose("model.pretrained=someone/absent", f"cache_dir={cache_dir}", f"out_dir={tmp_path}"))
    assert not (tmp_path / "results.json").exists()
    with caplog.at_level(logging.WARNING, logger="gblr"):
        result = runner.run(compose("experiment=gpt2_tiny_pydoc", "model.pretrained=someone/absent", "dry_run=true",
                                    f"out_dir={tmp_path}"))
    assert result["weights"].startswith("random init") and "hf download someone/absent" in result["weights"]
    assert any("RANDOM weights" in r.message and r.levelno == logging.WARNING for r in caplog.records)


def test_pretrained_vit_normalizes_as_its_config_says(hf_cache, tmp_path, cache_dir):
    import json

    from gblr.tasks import build_task

    tiny_vit_folder(tmp_path / "weights")
    config = json.loads((tmp_path / "weights" / "config.json").read_text())
    config["pretrained_cfg"].update(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])  # ImageNet's, as DeiT's
    (tmp_path / "weights" / "config.json").write_text(json.dumps(config))
    hf_cache("someone/deit-like", tmp_path / "weights")
    for pretrained, mean in [("someone/deit-like", [0.485, 0.456, 0.406]), (str(tmp_path / "weights"), [0.485, 0.456, 0.406]),
                             (None, [0.5, 0.5, 0.5])]:
        task = build_task(compose(f"model.pretrained={pretrained or 'null'}", f"cache_dir={cache_dir}"), "cpu")
        task.load_data()
        assert task.info["mean"] == pytest.approx(mean)
    # data.mean set explicitly wins over the weights' own
    task = build_task(compose("model.pretrained=someone/deit-like", "+data.mean=[0.1,0.1,0.1]", "+data.std=[1,1,1]",
                              f"cache_dir={cache_dir}"), "cpu")
    task.load_data()
    assert task.info["mean"] == pytest.approx([0.1, 0.1, 0.1])
