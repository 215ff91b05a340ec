"""The paper presets keep their settings and FLOP reports: compared with what commit c5b6a15 gave
(tests/data/paper_presets.json, made by tests/data/paper_presets.py)."""
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gblr.run.runner import run
from gblr.system.config import compose

STORED = json.loads((Path(__file__).parent / "data" / "paper_presets.json").read_text())
# ViT-B's dense dry run here; GPT-2's dense and low-rank ones in test_run_text.py, which runs them. The
# stored file holds no others: a projection of 36 to 60 large layers takes minutes on a CPU (the
# paper points of the other types are checked in test_flops.py and test_run_text.py).
DRY_RUNS = ["vit_base_imagenet_ft/dense"]


def settings(cfg) -> dict:
    c = OmegaConf.to_container(cfg, resolve=True)
    found = {k: c[k] for k in ("budget", "train", "start", "weight", "seed")}
    found["model"] = {k: c["model"][k] for k in ("name", "task", "pretrained", "targets", "kwargs")}
    found["data"] = c["data"]
    return found


@pytest.mark.parametrize("key", sorted(STORED))
def test_a_paper_preset_keeps_its_training_weight_and_budget_settings(key):
    preset, kind = key.split("/")
    assert settings(compose(f"experiment={preset}", f"weight={kind}")) == STORED[key]["settings"]


@pytest.mark.parametrize("key", DRY_RUNS)
def test_a_paper_preset_keeps_its_flop_report(key, tmp_path):
    preset, kind = key.split("/")
    flops = run(compose(f"experiment={preset}", f"weight={kind}", "dry_run=true", f"out_dir={tmp_path}"))["flops"]
    assert {k: flops[k] for k in STORED[key]["flops"]} == STORED[key]["flops"]
