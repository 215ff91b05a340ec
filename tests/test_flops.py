"""MAC counts: the families' analytic counts against hand-computed reference numbers, and the generic
count (gblr.structure.macs) against the analytic ones, to the MAC."""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from gblr.structure.family import NO_PAPER
from gblr.structure.macs import count_macs, mac_report, per_layer_report
from gblr.layers import build
from gblr.tasks.language import GPT2_TARGETS, build_gpt2, gpt2_macs
from gblr.tasks.vision import build_timm, split_qkv, vit_macs
from gblr.structure.surgery import replace_layers

# ViT-B/16 at 224 px: 197 tokens, 12 blocks.
VIT_B_LINEARS_PER_BLOCK = 1_394_343_936
VIT_B_ATTENTION_PER_BLOCK = 59_610_624
VIT_B_PATCH_CONV = 115_605_504
VIT_B_HEAD = 768_000
VIT_B_TOTAL = 12 * (VIT_B_LINEARS_PER_BLOCK + VIT_B_ATTENTION_PER_BLOCK) + VIT_B_PATCH_CONV + VIT_B_HEAD


def vit_b():
    with torch.device("meta"):  # shapes only
        return build_timm("vit_base")[0]


def gpt2_small():
    with torch.device("meta"):
        return build_gpt2("gpt2")[0]


def counted_macs(model, *inputs):
    """torch's count of the executed forward pass, in MACs (it reports FLOPs = 2 x MACs)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops() / 2


def test_dense_vit_b16_matches_spec():
    report = vit_macs(vit_b())
    assert report["tokens"] == 197
    assert report["macs"] == report["dense_macs"] == VIT_B_TOTAL
    assert report["macs"] == pytest.approx(17.58e9, rel=1e-3)
    assert report["attention_macs"] == 12 * VIT_B_ATTENTION_PER_BLOCK
    assert report["relative_model"] == 1.0 and report["relative_replaced"] is None
    # Paper convention without structured layers: the dense count over the paper's 17.2 G.
    assert report["paper"] == pytest.approx(VIT_B_TOTAL / 1.72e10)


def test_vit_b16_paper_counts_structured_layers_at_196_tokens():
    model = vit_b()
    split_qkv(model)
    for block in model.blocks:  # rank 96 everywhere: q, k, v 96 * 1536, fc1, fc2 96 * 3840 MACs per token
        for parent, child, (n_in, n_out) in ((block.attn, "q", (768, 768)), (block.attn, "k", (768, 768)),
                                             (block.attn, "v", (768, 768)), (block.mlp, "fc1", (768, 3072)),
                                             (block.mlp, "fc2", (3072, 768))):
            setattr(parent, child, build("lowrank", n_in, n_out, rank=96))
    structured_per_token = 3 * 96 * 1536 + 2 * 96 * 3840
    dense_per_token = 3 * 768 * 768 + 2 * 768 * 3072
    report = vit_macs(model)
    assert report["dense_macs"] == VIT_B_TOTAL
    assert report["replaced_macs"] == 12 * 197 * structured_per_token
    assert report["relative_replaced"] == pytest.approx(structured_per_token / dense_per_token)
    assert report["macs"] == VIT_B_TOTAL - 12 * 197 * (dense_per_token - structured_per_token)
    paper = VIT_B_TOTAL - 12 * 197 * dense_per_token + 12 * 196 * structured_per_token
    assert report["paper_macs"] == paper
    assert report["paper"] == pytest.approx(paper / 1.72e10)


def test_dense_gpt2_small_matches_spec():
    report = gpt2_macs(gpt2_small(), 1024)
    per_block = 1024 * 768 * 2304 + 1024 * 768**2 + 2 * 1024 * 768 * 3072 + 2 * 1024**2 * 768
    assert report["macs"] == report["dense_macs"] == 12 * per_block + 1024 * 768 * 50257  # LM head included
    assert report["paper"] == 1.0 and report["paper_macs"] == 96_636_764_160


@pytest.mark.parametrize("kind, options", [("lowrank", {"rank": 192}), ("monarch", {"nblocks": 4}),
                                           ("gblr", {"width_ratio": 0.25})])
def test_gpt2_small_quarter_width_is_paper_43_75_percent(kind, options):
    model = gpt2_small()
    for block in model.transformer.h:
        block.attn.c_attn = build(kind, 768, 2304, **options)
        block.mlp.c_fc = build(kind, 768, 3072, **options)
        block.mlp.c_proj = build(kind, 3072, 768, **options)
    report = gpt2_macs(model, 1024)
    assert report["paper"] == pytest.approx(0.4375, abs=1e-12)
    # Replaced-layer convention: 192 * (768 + 2304 + 2 * 3840) of 768 * (2304 + 2 * 3072) per token.
    assert report["relative_replaced"] == pytest.approx(2_064_384 / 6_488_064)
    # The paper's number does not depend on the sequence length counted here.
    assert gpt2_macs(model, 128)["paper"] == report["paper"]


def test_tiny_models_have_no_paper_convention():
    assert vit_macs(build_timm("vit_tiny")[0])["paper"] is None
    tiny = build_gpt2("gpt2_tiny", vocab_size=128, bos_token_id=0, eos_token_id=0)[0]
    assert count_macs(tiny, 16)["paper"] is None and count_macs(tiny, 16)["paper_official"] is None


def test_dense_vit_matches_torch_flop_counter():
    model = build_timm("vit_tiny", depth=2)[0].eval()
    for module in model.modules():  # fused SDPA is invisible to torch's counter on CPU (ours adds its formula)
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    assert vit_macs(model)["attention_macs"] > 0
    assert counted_macs(model, torch.randn(1, 3, 32, 32)) == vit_macs(model)["dense_macs"] == count_macs(model)["macs"]


def test_gpt2_matches_torch_flop_counter_dense_and_lowrank():
    model = build_gpt2("gpt2_tiny", vocab_size=128, bos_token_id=0, eos_token_id=0)[0].eval()
    ids = torch.randint(0, 128, (1, 24))
    report = count_macs(model, 24)
    assert counted_macs(model, ids) == pytest.approx(report["dense_macs"], rel=0.01)
    # Low-rank layers execute exactly what they cost (two thin GEMMs): the counter agrees with them too.
    replace_layers(model, GPT2_TARGETS, "lowrank", 0.25)
    report = count_macs(model, 24)
    assert report["macs"] < 0.6 * report["dense_macs"]
    assert counted_macs(model, ids) == pytest.approx(report["macs"], rel=0.01)


def test_per_layer_report():
    model = build_gpt2("gpt2_tiny", vocab_size=128, bos_token_id=0, eos_token_id=0)[0]
    replace_layers(model, ["mlp.c_fc"], "lowrank", 0.5)
    rows = per_layer_report(model)
    assert [row["name"] for row in rows] == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    row = rows[0]
    rank = int(0.5 * 64 * 256 / (64 + 256))
    assert row["kind"] == "lowrank" and row["shape"] == (256, 64)
    assert (row["macs_per_token"], row["dense_macs_per_token"]) == (rank * (64 + 256), 64 * 256)
    assert 0 < row["projection_error"] < 1


def test_a_model_of_no_known_family_is_rejected():
    with pytest.raises(ValueError, match="cannot count the MACs of a Linear"):
        count_macs(nn.Linear(4, 4))


def test_the_paper_low_rank_point_in_both_conventions():
    # The paper's ViT-B low-rank run at rank 96 (rho = 0.125): 16/11 x 96/768 = 0.1818 of the replaced
    # layers' MACs; the official code's counter (leaf modules, no attention matmuls, over 1.72e10)
    # reads 25.0%, our paper convention (attention matmuls counted) 29.1%.
    model, _ = build_timm("vit_base", num_classes=1000)
    split_qkv(model)
    for name, old in list(model.named_modules()):
        if name.endswith(("attn.q", "attn.k", "attn.v", "mlp.fc1", "mlp.fc2")):  # random factors: no SVD needed
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, build("lowrank", old.in_features, old.out_features, rank=96))
    macs = count_macs(model)
    assert macs["relative_replaced"] == pytest.approx(16 / 11 * 96 / 768)
    assert macs["paper_official"] == pytest.approx(0.2502, abs=1e-4)
    assert macs["paper"] == pytest.approx(0.2907, abs=1e-4)


ANALYTIC_KEYS = ("macs", "dense_macs", "replaced_macs", "replaced_dense_macs", "tokens", *NO_PAPER)


def structured_vit_b():
    """ViT-B/16 on the meta device with q, k, v low-rank (rank 96), fc1 Monarch (4 blocks), fc2 GBLR."""
    model = vit_b()
    split_qkv(model)
    kinds = {"q": ("lowrank", {"rank": 96}), "k": ("lowrank", {"rank": 96}), "v": ("lowrank", {"rank": 96}),
             "fc1": ("monarch", {"nblocks": 4}), "fc2": ("gblr", {"width_ratio": 0.25})}
    for block in model.blocks:  # the structured layers on the CPU: they are counted, never run
        for parent, child in ((block.attn, "q"), (block.attn, "k"), (block.attn, "v"), (block.mlp, "fc1"),
                              (block.mlp, "fc2")):
            old = getattr(parent, child)
            kind, options = kinds[child]
            setattr(parent, child, build(kind, old.in_features, old.out_features, **options))
    return model


def structured_gpt2_small():
    model = gpt2_small()
    for block in model.transformer.h:
        block.attn.c_attn = build("lowrank", 768, 2304, rank=192)
        block.mlp.c_fc = build("monarch", 768, 3072, nblocks=4)
        block.mlp.c_proj = build("gblr", 3072, 768, width_ratio=0.25)
    return model


@pytest.mark.parametrize("make", [vit_b, structured_vit_b, lambda: build_timm("vit_tiny")[0]])
def test_generic_count_equals_the_analytic_vit_count_to_the_mac(make):
    model = make()
    generic, analytic = count_macs(model), vit_macs(model)
    assert {k: generic[k] for k in ANALYTIC_KEYS} == {k: analytic[k] for k in ANALYTIC_KEYS}


@pytest.mark.parametrize("make, tokens", [(gpt2_small, 1024), (structured_gpt2_small, 1024), (structured_gpt2_small, 100),
                                          (lambda: build_gpt2("gpt2_tiny", vocab_size=128, bos_token_id=0,
                                                              eos_token_id=0)[0], 64)])
def test_generic_count_equals_the_analytic_gpt2_count_to_the_mac(make, tokens):
    model = make()
    generic, analytic = count_macs(model, tokens), gpt2_macs(model, tokens)
    assert {k: generic[k] for k in ANALYTIC_KEYS} == {k: analytic[k] for k in ANALYTIC_KEYS}


def test_the_report_keeps_the_paper_points():
    """mac_report's conventions at the paper's points: GPT-2 small at quarter width is 43.75% in the paper's
    convention; ViT-B/16 low-rank at rank 96 is 0.1818 of the replaced layers' MACs."""
    gpt2 = structured_gpt2_small()
    report = mac_report(gpt2, 1024)
    assert report["paper"] == pytest.approx(0.4375, abs=1e-12) and report["tokens"] == 1024
    assert report["replaced"] == pytest.approx(gpt2_macs(gpt2, 1024)["relative_replaced"])
