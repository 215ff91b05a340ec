"""The exported model: a finished run's model.safetensors + model.json load back to the same metric."""
import json

import pytest
import torch

from gblr.run import export
from gblr.system.config import compose
from gblr.layers import LAYERS, GBLRInference, StructuredLinear, build, from_dense
from gblr.run.runner import run
from gblr.tasks import build_task

# As tests/test_run_vision.py's quick runs (so a full session trains the dense start once).
QUICK = ["start.epochs=3", "train.epochs=1", "train.batch_size=128"]


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_build_options_rebuild_the_shapes_of_every_weight_type(kind, one_thread):
    torch.manual_seed(0)
    layer = from_dense(kind, torch.randn(24, 40), torch.randn(24), 0.3)
    twin = build(kind, 40, 24, 1.0, True, **layer.build_options())
    twin.load_state_dict(layer.state_dict())  # strict: same names and shapes
    torch.testing.assert_close(twin.to_dense(), layer.to_dense())
    assert twin.macs_per_token() == layer.macs_per_token()


def test_a_penalty_run_exports_its_projected_model_which_reloads_to_the_same_metric(tmp_path, cache_dir):
    torch.set_num_threads(1)
    result = run(compose(f"cache_dir={cache_dir}", f"out_dir={tmp_path}", *QUICK, "weight=gblr", "budget=0.3",
                         "weight.budget_mode=penalty", "weight.penalty=0.01"))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["export"] == {"weights": "model.safetensors", "config": "model.json"}
    config = json.loads((tmp_path / "model.json").read_text())
    assert (config["weight"]["kind"], config["weight"]["budget_mode"], config["dtype"]) == ("gblr", "penalty", "float32")

    model = export.load(tmp_path)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, StructuredLinear)}
    # the hard structure that results.json reports, after the budget's final projection
    assert {l["name"]: l["macs_per_token"] for l in saved["layers"]} == {n: m.macs_per_token() for n, m in layers.items()}
    assert sum(m.macs_per_token() for m in layers.values()) <= 0.3 * sum(m.dense_macs_per_token() for m in layers.values())
    task = build_task(compose(f"cache_dir={cache_dir}"), "cpu")
    task.load_data()
    assert task.evaluate(model)["top1"] == pytest.approx(result["metrics"]["top1"])
    assert config["metric"] == {"name": "top1", "value": result["metrics"]["top1"]}

    fast = export.load(tmp_path / "model.json", inference=True, mode="blocks")
    assert all(isinstance(m, GBLRInference) for n, m in fast.named_modules() if n in layers)
    assert task.evaluate(fast)["top1"] == pytest.approx(result["metrics"]["top1"], abs=100 / 360 + 1e-9)  # one image


def test_gpt2_export_round_trip(tmp_path):
    from gblr.tasks.language import build_gpt2
    from gblr.structure.surgery import replace_layers

    torch.manual_seed(0)
    model, _ = build_gpt2("gpt2_tiny", vocab_size=300, bos_token_id=0, eos_token_id=0)
    replace_layers(model, None, "lowrank", 0.3)
    export.save(tmp_path, model, {"model": "gpt2_tiny", "weight": "lowrank", "budget": 0.3})
    loaded = export.load(tmp_path)
    ids = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # still tied
    assert loaded.config._attn_implementation == "eager"


def test_load_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no exported model in .*model.json and model.safetensors"):
        export.load(tmp_path)
