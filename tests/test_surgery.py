"""gblr.structure.surgery: qkv split, layer replacement in timm ViT and HF GPT-2, target errors."""
import copy
import logging

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from gblr.layers import StructuredLinear
from gblr.tasks.language import build_gpt2
from gblr.tasks.vision import build_timm
from gblr.structure.surgery import default_targets, replace_layers, structured_layers
from gblr.tasks.language import GPT2_TARGETS
from gblr.tasks.vision import VIT_TARGETS, split_qkv


def tiny_vit():
    torch.manual_seed(0)
    return build_timm("vit_tiny", depth=2)[0].eval()


def tiny_gpt2():
    torch.manual_seed(0)
    return build_gpt2("gpt2_tiny", vocab_size=128, bos_token_id=0, eos_token_id=0)[0].eval()


IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))


def test_split_qkv_keeps_outputs_and_names():
    model = tiny_vit()
    fused = model.blocks[0].attn.qkv.weight.detach().clone()
    expected = model(IMAGES)
    assert split_qkv(model) == 2
    assert split_qkv(model) == 0  # idempotent
    torch.testing.assert_close(model(IMAGES), expected, atol=1e-6, rtol=0)
    attn = model.blocks[0].attn
    for i, part in enumerate("qkv"):
        layer = getattr(attn, part)
        assert isinstance(layer, nn.Linear) and (layer.in_features, layer.out_features) == (64, 64)
        torch.testing.assert_close(layer.weight, fused[64 * i:64 * (i + 1)])
    names = {name for name, _ in model.named_parameters()}
    assert "blocks.0.attn.q.weight" in names and not any(".qkv." in name for name in names)


def test_split_model_copies_independently():
    # qkv reads q, k, v through a back-reference: a deep copy must read its own q, not the original's.
    model = tiny_vit()
    split_qkv(model)
    expected = model(IMAGES)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.blocks[0].attn.q.weight.zero_()
    torch.testing.assert_close(model(IMAGES), expected)
    assert not torch.allclose(clone(IMAGES), expected)


def test_dense_replacement_keeps_vit_logits():
    model = tiny_vit()
    expected = model(IMAGES)
    replaced = replace_layers(model, VIT_TARGETS, "dense", 1.0)
    assert [name for name, _ in replaced] == [f"blocks.{b}.{t}" for b in range(2) for t in
                                              ("attn.q", "attn.k", "attn.v", "mlp.fc1", "mlp.fc2")]
    assert all(layer.kind == "dense" for _, layer in replaced)
    assert isinstance(model.blocks[0].attn.proj, nn.Linear) and isinstance(model.head, nn.Linear)
    torch.testing.assert_close(model(IMAGES), expected, atol=1e-5, rtol=0)


def test_dense_replacement_keeps_gpt2_logits():
    model = tiny_gpt2()
    expected = model(IDS).logits
    replaced = replace_layers(model, GPT2_TARGETS, "dense", 1.0)
    assert [name for name, _ in replaced] == [f"transformer.h.{b}.{t}" for b in range(2) for t in GPT2_TARGETS]
    # Conv1D weights are (in, out): the replacement holds the transpose, shaped like nn.Linear.
    c_fc = model.transformer.h[0].mlp.c_fc
    assert (c_fc.in_features, c_fc.out_features) == (64, 256) and c_fc.to_dense().shape == (256, 64)
    assert isinstance(model.transformer.h[0].attn.c_proj, Conv1D) and isinstance(model.lm_head, nn.Linear)
    torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=0)
    # A square Conv1D would run untransposed without an error; its outputs would not match.
    replace_layers(model, ["attn.c_proj"], "dense", 1.0)
    torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=0)


def test_replacement_meets_budget_and_is_found_again():
    model = tiny_gpt2()
    replaced = replace_layers(model, None, "lowrank", 0.5)
    assert [name for name, _ in structured_layers(model)] == [name for name, _ in replaced]
    for _, layer in replaced:
        assert isinstance(layer, StructuredLinear) and layer.kind == "lowrank"
        assert layer.macs_per_token() <= 0.5 * layer.dense_macs_per_token()
    assert model(IDS).logits.shape == (2, 10, 128)


def test_replacement_keeps_dtype():
    model = tiny_gpt2().double()
    expected = model(IDS).logits
    replaced = replace_layers(model, ["mlp.c_fc"], "dense", 1.0)
    assert all(p.dtype == torch.float64 for _, layer in replaced for p in layer.parameters())
    torch.testing.assert_close(model(IDS).logits, expected)


def test_unmatched_target_is_named_and_nothing_changes():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="'mlp.fc9' matches no"):
        replace_layers(model, ["mlp.c_fc", "mlp.fc9"], "dense", 1.0)
    assert structured_layers(model) == []


def test_default_targets_are_every_linear_layer_but_the_head():
    parts = ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2")
    assert default_targets(tiny_vit()) == tuple(f"blocks.{b}.{p}" for b in range(2) for p in parts)
    gpt2 = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert default_targets(tiny_gpt2()) == tuple(f"transformer.h.{b}.{p}" for b in range(2) for p in gpt2)
    with pytest.raises(ValueError, match="Sequential"):
        default_targets(nn.Sequential(nn.Linear(2, 2)))


def test_conversion_logs_one_line_per_layer_in_model_order(caplog):
    model = tiny_gpt2()
    with caplog.at_level(logging.INFO, logger="gblr"):
        replaced = replace_layers(model, GPT2_TARGETS, "lowrank", 0.3)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("converted ")]
    assert len(lines) == len(replaced) == 3 * 2  # c_attn, c_fc, c_proj in each of 2 blocks
    for i, (line, (name, layer)) in enumerate(zip(lines, replaced), start=1):
        assert line.startswith(f"converted {i}/{len(replaced)} {name} ({layer.out_features}x{layer.in_features}) "
                               f"to lowrank in ")
