"""The runner on the vision path: configs, results, budgets, resume, bad input."""
import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from gblr.system.config import ROOT, compose
from gblr.run.runner import run

QUICK = ["start.epochs=3", "train.epochs=1", "train.batch_size=128"]


def quick_run(tmp_path, cache_dir, *overrides):
    cfg = compose(f"cache_dir={cache_dir}", f"out_dir={tmp_path}", *QUICK, *overrides)
    return run(cfg)


@pytest.mark.parametrize("weight", ["dense", "lowrank", "monarch", "gblr"])
def test_every_weight_type_runs_end_to_end_on_the_embedded_digits(tmp_path, cache_dir, weight):
    result = quick_run(tmp_path, cache_dir, f"weight={weight}")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metrics"] == pytest.approx(result["metrics"])
    assert {"model", "data", "weight", "budget", "seed", "metrics", "flops", "layers", "time_s", "versions"} <= set(saved)
    assert {"top1", "top5", "start_top1"} <= set(saved["metrics"])
    assert {"macs", "dense_macs", "replaced", "model", "paper"} <= set(saved["flops"])
    assert saved["data"] == "digits" and "digits" in saved["data_description"] and "ImageNet" not in saved["data_description"]
    assert saved["flops"]["paper"] is None  # the paper has no convention for a tiny ViT
    assert 0 <= saved["metrics"]["top5"] <= 100 and saved["metrics"]["top1"] <= saved["metrics"]["top5"]
    assert saved["flops"]["replaced"] <= saved["budget"]
    assert len(saved["layers"]) == 4 * 5  # q, k, v, fc1, fc2 in each of 4 blocks
    assert all(layer["kind"] == weight for layer in saved["layers"])
    if weight == "dense":
        assert saved["budget"] == 1.0 and saved["flops"]["replaced"] == 1.0  # a dense layer ignores the budget
    else:
        assert saved["flops"]["model"] < 1.0


@pytest.mark.parametrize("weight", ["lowrank", "monarch", "gblr", "blast"])
@pytest.mark.parametrize("budget", [0.12, 0.3, 0.55, 0.8])
def test_reported_macs_never_exceed_the_budget(tmp_path, weight, budget):
    result = run(compose(f"out_dir={tmp_path}", f"weight={weight}", f"budget={budget}", "dry_run=true"))
    assert result["flops"]["replaced"] <= budget
    total = sum(layer["macs_per_token"] for layer in result["layers"])
    assert total == result["flops"]["replaced_macs"] // result["flops"]["tokens"]
    assert total <= budget * sum(layer["dense_macs_per_token"] for layer in result["layers"])


def test_gblr_budget_modes_meet_the_budget_after_training(tmp_path, cache_dir):
    for mode in ["global", "uniform"]:
        result = quick_run(tmp_path / mode, cache_dir, "weight=gblr", f"weight.budget_mode={mode}", "budget=0.2")
        assert result["flops"]["replaced"] <= 0.2
        if mode == "uniform":
            assert all(layer["macs_per_token"] <= 0.2 * layer["dense_macs_per_token"] for layer in result["layers"])


def test_dry_run_of_dense_vit_base_reports_its_17_56_g_macs(tmp_path):
    # The command: with the default data (10 digit classes) only the head is smaller.
    result = run(compose(f"out_dir={tmp_path}", "model=vit_base", "weight=dense", "dry_run=true"))
    assert result["flops"]["macs"] == pytest.approx(17.56e9, rel=1e-3)
    assert "random init" in result["weights"] and "not loaded" in result["weights"]  # offline: says so
    assert (tmp_path / "results.json").exists() and result["metrics"] == {}
    # With ImageNet's 1000 classes (a dry run reads no data): the per-block sum exactly (17.56 G).
    result = run(compose(f"out_dir={tmp_path}", "model=vit_base", "data=imagenet", "weight=dense", "dry_run=true"))
    assert result["flops"]["dense_macs"] == result["flops"]["macs"] == 12 * (1_394_343_936 + 59_610_624) + 115_605_504 + 768_000  # 17,563,828,224


def test_every_config_option_composes():
    groups = {group: sorted(p.stem for p in (ROOT / "configs" / group).glob("*.yaml"))
              for group in ["model", "weight", "data", "logger", "experiment"]}
    assert {"vit_tiny", "vit_base", "timm", "causal_lm"} <= set(groups["model"]) and len(groups["weight"]) >= 4
    for group, options in groups.items():
        for option in options:
            cfg = compose(f"{group}={option}")
            plain = OmegaConf.to_container(cfg, resolve=True)
            assert "targets" not in plain["weight"] and "targets" in plain["model"]  # the model owns its targets
            assert plain["model"]["targets"] or option in ("timm", "causal_lm")  # null: the family's default
            assert 0 < plain["budget"] <= 1
    paper = compose("experiment=vit_base_imagenet_ft")
    assert (paper.model.name, paper.data.name, paper.train.epochs, paper.train.lr) == ("vit_base", "imagenet", 35, 1e-4)
    task = paper.model.task
    assert task.mixup == 0.8 and task.cutmix == 1.0 and paper.data.auto_augment == "rand-m9-mstd0.5-inc1"
    # The preset's budget is one of the paper's four points, the ones its sweep runs.
    sweep = OmegaConf.load(ROOT / "configs" / "sweep" / "paper_vit_imagenet_ft.yaml")
    points = [float(b) for b in str(sweep.hydra.sweeper.params.budget).split(",")]
    assert paper.budget in points and paper.budget == 0.2898
    smoke = compose("experiment=smoke")  # the quick check: the default run, shorter
    assert (smoke.model.name, smoke.data.name, smoke.weight.kind) == ("vit_tiny", "digits", "gblr")
    assert 1 <= smoke.start.epochs < compose().start.epochs and 1 <= smoke.train.epochs < compose().train.epochs


def test_resume_after_an_interruption_reaches_the_same_final_metrics(tmp_path, cache_dir):
    settings = ["weight=gblr", "train.epochs=2"]
    straight = quick_run(tmp_path / "straight", cache_dir, *settings)
    stopped = quick_run(tmp_path / "resumed", cache_dir, *settings, "train.stop_after=1")
    assert stopped["completed"] is False and not (tmp_path / "resumed" / "results.json").exists()
    resumed = quick_run(tmp_path / "resumed", cache_dir, *settings, "resume=true")
    assert resumed["metrics"] == straight["metrics"]
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in straight["history"]]


# An earlier dry run's report: a folder any later run may replace, so only the bad input stops these runs.
EARLIER = json.dumps({"dry_run": True, "completed": True, "note": "earlier results"})


@pytest.mark.parametrize("overrides,message", [
    (["budget=0"], "budget must be a number in (0, 1]"),
    (["budget=1.5"], "got 1.5"),
    (["budget=abc"], "got 'abc'"),
    (["data=imagenet"], "data.root=/path/to/imagenet"),
    (["data=imagenet", "data.root=/no/such/imagenet"], "/no/such/imagenet does not exist; expected train/<class>/"),
    (["model.pretrained=/no/such/file.pth"], "/no/such/file.pth"),
    (["weight.budget_mode=magic"], "weight.budget_mode must be one of"),
])
def test_bad_input_is_a_clear_error_before_anything_is_written(tmp_path, cache_dir, overrides, message):
    (tmp_path / "results.json").write_text(EARLIER)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        quick_run(tmp_path, cache_dir, *overrides)
    assert message in str(error.value)
    assert (tmp_path / "results.json").read_text() == EARLIER


@pytest.mark.parametrize("overrides,message", [
    (["budget=abc"], "error: budget must be a number in (0, 1] (target MACs / dense MACs of a layer), got 'abc'"),
    (["data=imagenet", "data.root=/no/such/imagenet"], "error: image folder /no/such/imagenet does not exist"),
])
def test_command_line_errors_are_one_line_with_a_nonzero_exit(tmp_path, overrides, message):
    (tmp_path / "results.json").write_text(EARLIER)
    proc = subprocess.run([sys.executable, "run.py", f"out_dir={tmp_path}", *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(message)
    assert (tmp_path / "results.json").read_text() == EARLIER


@pytest.mark.e2e
def test_default_run_dense_start_above_90_and_gblr_within_5_points(tmp_path, cache_dir):
    result = run(compose(f"cache_dir={cache_dir}", f"out_dir={tmp_path}"))  # python run.py
    assert (result["model"], result["data"], result["weight"], result["budget"]) == ("vit_tiny", "digits", "gblr", 0.3)
    assert result["metrics"]["start_top1"] >= 90
    assert result["metrics"]["top1"] >= result["metrics"]["start_top1"] - 5
    assert result["flops"]["replaced"] <= 0.3


def test_no_component_dies_at_budget_0_1_and_the_counts_are_reported(tmp_path, cache_dir):
    # Before zero-cost widths were left alone, 3 epochs at budget 0.1 left 59% of the components dead.
    result = quick_run(tmp_path, cache_dir, "weight=gblr", "budget=0.1")
    counts = [layer["components"] for layer in result["layers"]]
    total = sum(sum(c.values()) for c in counts)
    assert total == sum(min(layer["shape"]) for layer in result["layers"])
    dead = sum(c["dead"] for c in counts) / total
    assert dead < 0.59 and sum(c["active"] for c in counts) > 0
    assert result["flops"]["replaced"] <= 0.1
