"""The calibration pass (input Grams), the runner's layer options, compress-only runs, and their checks."""
import inspect
import json
import logging

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from gblr.structure.calibration import calibrate, gram_bytes, input_grams
from gblr.system.config import compose
from gblr.layers import LowRankLinear
from gblr.run.runner import run
from gblr.tasks.base import Task
from gblr.run.validate import check_config


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model():
    """x (..., 5) -> Linear(5, 7) -> GELU -> HF Conv1D(7 -> 3): one target of each kind."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.GELU(), Conv1D(3, 7), nn.Dropout(0.5))


def test_grams_are_x_transpose_x_of_each_layers_inputs_and_the_model_is_untouched():
    model = tiny_model().train()
    batches = [torch.randn(4, 6, 5), torch.randn(2, 6, 5)]
    layers = [("0", model[0]), ("2", model[2])]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = [model.eval()(b) for b in batches]
    model.train()
    grams, tokens = input_grams(model, layers, batches, lambda m, b: m(b))
    x = torch.cat([b.reshape(-1, 5) for b in batches]).double()
    hidden = torch.cat([model[1](model[0](b)).reshape(-1, 7) for b in batches]).double()
    assert torch.allclose(grams["0"], x.T @ x) and torch.allclose(grams["2"], hidden.T @ hidden)
    assert grams["0"].dtype == torch.float64 and tokens == 36
    assert model.training and not model[0]._forward_hooks and not model[2]._forward_hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(model.eval()(b), y) for b, y in zip(batches, before))  # eval mode: no dropout in the pass
    assert gram_bytes(layers) == 8 * (5 * 5 + 7 * 7)


class ListTask(Task):
    """A task over a list of tensors, without a config file: enough for calibration_batches."""

    def __init__(self, examples):
        from omegaconf import OmegaConf

        self.train_set, self.cfg = examples, OmegaConf.create({"train": {"num_workers": 0}})

    def loss(self, model, batch):
        return model(batch).sum()


def test_calibration_batches_are_the_first_of_a_seeded_permutation_whatever_the_global_seed():
    task = ListTask([torch.full((5,), float(i)) for i in range(40)])
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(123)
    first = [b[:, 0].long().tolist() for b in task.calibration_batches(3, 8, seed=3)]
    torch.manual_seed(456)
    assert first == [b[:, 0].long().tolist() for b in task.calibration_batches(3, 8, seed=3)]
    assert first == order[:24].view(3, 8).tolist()
    with pytest.raises(ValueError, match="use at most 5 batches"):
        task.calibration_batches(6, 8, seed=3)
    model = tiny_model()
    grams, report = calibrate(model, [("0", model[0])], task, 3, 3, 8)
    x = torch.stack([task.train_set[i] for i in order[:24]]).double()
    assert torch.allclose(grams["0"], x.T @ x)
    assert report["batches"] == 3 and report["tokens"] == 24 and report["memory_bytes"] == 8 * 25


@pytest.fixture
def recorded_grams(monkeypatch):
    """Low-rank's projection, recording the Gram each layer gets (and dropping it where the
    projection does not take one yet, so that the runner's plumbing is tested either way)."""
    original, seen = LowRankLinear.from_dense.__func__, {}
    takes_gram = "gram" in inspect.signature(original).parameters

    def from_dense(cls, weight, bias, budget, rank=None, gram=None):
        seen[len(seen)] = (tuple(weight.shape), gram, rank)
        extra = {"gram": gram} if takes_gram else {}
        return original(cls, weight, bias, budget, rank=rank, **extra)

    monkeypatch.setattr(LowRankLinear, "from_dense", classmethod(from_dense))
    return seen


def test_compress_only_with_calibration_and_global_ranks_records_it_all(tmp_path, cache_dir, recorded_grams, caplog):
    caplog.set_level(logging.INFO, logger="gblr")
    result = run(compose(f"cache_dir={cache_dir}", f"out_dir={tmp_path}", "start.epochs=3", "train.batch_size=128",
                         "weight=lowrank", "weight.calibration.batches=2", "weight.allocation=global",
                         "train.epochs=0"))
    saved = json.loads((tmp_path / "results.json").read_text())
    m = saved["metrics"]
    assert m["converted_top1"] == m["top1"] and {"top5", "nll", "start_top1"} <= set(m) and saved["history"] == []
    assert "export" in saved and (tmp_path / "model.safetensors").exists()
    # 2 batches of 128 digits, 65 tokens each (64 patches + the class token); Grams of 4 blocks x (4 x 64^2 + 256^2)
    assert saved["calibration"]["batches"] == 2 and saved["calibration"]["tokens"] == 2 * 128 * 65
    assert saved["calibration"]["memory_bytes"] == 4 * (4 * 64**2 + 256**2) * 8 == result["calibration"]["memory_bytes"]
    assert saved["calibration"]["seconds"] > 0
    calls = list(recorded_grams.values())[-20:]  # the 20 replaced layers (after check_conversion's probes)
    assert all(g is not None and g.shape == (s[1], s[1]) and g.dtype == torch.float64 for s, g, _ in calls)
    q, k, v = (calls[i][1] for i in range(3))  # q, k and v read the same input
    assert torch.equal(q, k) and torch.equal(q, v) and float(torch.linalg.eigvalsh(q).min()) > -1e-6 * float(q.trace())
    ranks = [r for _, _, r in calls]
    assert all(r >= 1 for r in ranks) and [layer["macs_per_token"] for layer in saved["layers"]] == \
        [r * sum(s) for (s, _, _), r in zip(calls, ranks)]
    assert saved["flops"]["replaced"] <= saved["budget"] and len(set(ranks)) > 1
    assert any("calibration: 2 batches" in r.message and "MiB" in r.message for r in caplog.records)


def test_dry_run_of_the_gblr_fit_counts_its_start_without_fitting(tmp_path, monkeypatch, caplog):
    import gblr.layers.gblr

    def no_fit(*args, **kwargs):
        raise AssertionError("a dry run ran the fit")

    monkeypatch.setattr(gblr.layers.gblr, "fit_gblr", no_fit)
    caplog.set_level(logging.INFO, logger="gblr")
    result = run(compose(f"out_dir={tmp_path}", "weight=gblr", "weight.options.init=fit", "dry_run=true"))
    assert 0 < result["flops"]["replaced"] <= result["budget"] and result["calibration"] is None
    assert sum("fit (init=fit) is not run" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("overrides,message", [
    (["weight=gblr", "weight.allocation=global"], "weight.allocation must be uniform for weight=gblr"),
    (["weight=monarch", "weight.allocation=global"], "weight.allocation must be uniform for weight=monarch"),
    (["weight=lowrank", "weight.allocation=global", "weight.options.rank=4"],
     "weight.allocation=global chooses each layer's rank, but weight.options.rank=4 fixes it"),
])
def test_global_allocation_is_refused_where_it_does_not_apply(overrides, message):
    with pytest.raises(ValueError) as error:
        check_config(compose(*overrides))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_calibration_needs_a_projection_that_takes_the_gram(monkeypatch):
    def from_dense(cls, weight, bias, budget, rank=None):
        raise AssertionError("not called")

    monkeypatch.setattr(LowRankLinear, "from_dense", classmethod(from_dense))
    with pytest.raises(ValueError, match="weight=lowrank's projection takes no input Gram"):
        check_config(compose("weight=lowrank", "weight.calibration.batches=8"))
    check_config(compose("weight=dense", "weight.calibration.batches=8"))  # dense ignores it
    check_config(compose("weight=lowrank", "train.epochs=0", "weight.allocation=global"))
