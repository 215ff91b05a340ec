"""gblr.tasks.models: the four model builds, local weights, and offline behaviour of hub names."""

import pytest
import torch
from safetensors.torch import save_file

from gblr.system.hub import WeightsNotFound, find_pretrained
from gblr.tasks.language import build_gpt2
from gblr.tasks.vision import build_timm

VIT_HUB = "timm/vit_base_patch16_224.augreg_in21k_ft_in1k"


def tiny_gpt2(**overrides):
    return build_gpt2("gpt2_tiny", vocab_size=128, bos_token_id=0, eos_token_id=0, **overrides)


def test_vit_tiny_shapes_and_names():
    model, weights = build_timm("vit_tiny")
    assert weights == "random init"
    names = dict(model.named_modules())
    for name in ("blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.3.mlp.fc1", "blocks.3.mlp.fc2", "head"):
        assert name in names
    assert len(model.blocks) == 4 and model.embed_dim == 64 and model.patch_embed.num_patches == 64
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)

    small, _ = build_timm("vit_tiny", embed_dim=32, depth=2, in_chans=1, num_classes=5)
    assert small.embed_dim == 32 and len(small.blocks) == 2
    assert small(torch.randn(1, 1, 32, 32)).shape == (1, 5)


def test_vit_base_is_timm_vit_b16():
    with torch.device("meta"):  # shapes only: no 86M-parameter init
        model, weights = build_timm("vit_base")
    assert weights == "random init"
    assert tuple(model.patch_embed.patch_size) == (16, 16) and tuple(model.patch_embed.img_size) == (224, 224)
    assert model.embed_dim == 768 and len(model.blocks) == 12 and model.head.out_features == 1000
    assert model.patch_embed.num_patches + model.num_prefix_tokens == 197


def test_gpt2_configs_and_eager_attention():
    with torch.device("meta"):
        small, _ = build_gpt2("gpt2")
    config = small.config
    assert (config.n_embd, config.n_layer, config.n_head, config.n_positions, config.vocab_size) == \
        (768, 12, 12, 1024, 50257)
    assert config._attn_implementation == "eager"

    tiny, weights = tiny_gpt2()
    assert weights == "random init"
    assert (tiny.config.n_embd, tiny.config.n_layer, tiny.config.n_head, tiny.config.n_positions) == (64, 2, 2, 128)
    assert tiny.config._attn_implementation == "eager"
    assert tiny(torch.randint(0, 128, (2, 9))).logits.shape == (2, 9, 128)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="vit_huge"):
        build_timm("vit_huge")
    with pytest.raises(ValueError, match="gpt3"):
        build_gpt2("gpt3")


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "safetensors"])
def test_vit_local_state_dict_round_trip(tmp_path, wrap):
    torch.manual_seed(0)
    source, _ = build_timm("vit_tiny")
    state = source.state_dict()
    if wrap == "safetensors":
        path = tmp_path / "vit.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "vit.pth"
        torch.save(state if wrap == "plain" else {wrap: state, "epoch": 3}, path)
    torch.manual_seed(1)
    loaded, weights = build_timm("vit_tiny", pretrained=str(path))
    assert weights == f"local file {path}"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), source.eval()(x))


def test_vit_local_weights_that_do_not_fit(tmp_path):
    source, _ = build_timm("vit_tiny", num_classes=7)
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    # Another label set: the head is left at random init and the note says so.
    model, weights = build_timm("vit_tiny", pretrained=str(path), num_classes=10)
    assert "head re-initialized" in weights and "7 classes" in weights
    torch.testing.assert_close(model.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)
    # Another architecture: a clear error, not a silently partial load.
    with pytest.raises(ValueError, match="do not fit the model: missing .*blocks.4"):
        build_timm("vit_tiny", pretrained=str(path), depth=6)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read pretrained weights.*corrupt.pth"):
        build_timm("vit_tiny", pretrained=str(corrupt))


def test_gpt2_local_directory_and_file(tmp_path):
    torch.manual_seed(0)
    source, _ = tiny_gpt2()
    source.save_pretrained(tmp_path / "dir")
    ids = torch.randint(0, 128, (2, 12))
    expected = source.eval()(ids).logits

    from_dir, weights = build_gpt2("gpt2_tiny", pretrained=str(tmp_path / "dir"))
    assert weights.startswith("local folder") and from_dir.config._attn_implementation == "eager"
    torch.testing.assert_close(from_dir.eval()(ids).logits, expected)

    # A state-dict file without the tied LM head (it is wte.weight) loads through its twin.
    state = {k: v for k, v in source.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, tmp_path / "gpt2.pt")
    from_file, _ = tiny_gpt2(pretrained=str(tmp_path / "gpt2.pt"))
    torch.testing.assert_close(from_file.eval()(ids).logits, expected)


def test_missing_local_path_names_it(tmp_path):
    missing = tmp_path / "nowhere" / "vit.pth"
    with pytest.raises(FileNotFoundError, match="nowhere/vit.pth"):
        build_timm("vit_tiny", pretrained=str(missing))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_gpt2("gpt2_tiny", pretrained="./no_such_gpt2_dir")


def test_hub_names_missing_from_the_cache_fail_fast_offline(hf_cache, monkeypatch):
    import socket

    def connect(*args, **kwargs):  # failing fast offline means never waiting on the network
        raise AssertionError(f"a network connection was tried offline: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", connect)
    with pytest.raises(WeightsNotFound, match=r"'timm/vit_base_patch16_224.augreg_in21k_ft_in1k' are not in the Hugging "
                                              r"Face cache .*HF_HUB_OFFLINE=1 is set.*`hf download timm/vit_base_patch16"):
        build_timm("vit_base", pretrained=VIT_HUB)
    with pytest.raises(WeightsNotFound, match=r"'openai-community/gpt2'.*`hf download openai-community/gpt2`"):
        build_gpt2("gpt2", pretrained="openai-community/gpt2")


def test_find_pretrained_classifies(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"")
    assert find_pretrained(None) == ("none", None)
    assert find_pretrained(str(tmp_path)) == ("dir", str(tmp_path))
    assert find_pretrained(str(tmp_path / "w.pt")) == ("file", str(tmp_path / "w.pt"))
    assert find_pretrained(VIT_HUB) == ("hub", VIT_HUB)
    assert find_pretrained("hf-hub:" + VIT_HUB) == ("hub", VIT_HUB)


def test_random_fallback_says_why(hf_cache, tmp_path):
    with torch.device("meta"):
        model, weights = build_timm("vit_base", pretrained=VIT_HUB, allow_random_fallback=True)
    assert model.embed_dim == 768
    assert weights.startswith("random init") and VIT_HUB in weights and "HF_HUB_OFFLINE" in weights
    _, weights = tiny_gpt2(pretrained=str(tmp_path / "missing.pt"), allow_random_fallback=True)
    assert weights.startswith("random init") and "missing.pt" in weights
    # A file that exists but is broken is an error even with the fallback on.
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could not read"):
        tiny_gpt2(pretrained=str(corrupt), allow_random_fallback=True)


def test_vit_file_goes_through_timms_checkpoint_filter(tmp_path):
    # Weights for 32 px (8x8 patches) into a 48 px model (12x12): timm's filter resamples the
    # position embeddings; everything else loads as saved.
    source, _ = build_timm("vit_tiny")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    model, weights = build_timm("vit_tiny", pretrained=str(tmp_path / "vit.safetensors"), img_size=48)
    assert weights == f"local file {tmp_path / 'vit.safetensors'}"
    assert model.pos_embed.shape == (1, 1 + 12 * 12, 64) and source.pos_embed.shape == (1, 1 + 8 * 8, 64)
    torch.testing.assert_close(model.blocks[2].mlp.fc2.weight, source.blocks[2].mlp.fc2.weight)
    torch.testing.assert_close(model.pos_embed[:, 0], source.pos_embed[:, 0])  # the class token's own
