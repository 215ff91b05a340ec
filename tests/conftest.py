"""Tests run offline: no hub, no wandb; Hydra configs composed from the repository's configs/."""
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"

ROOT = Path(__file__).resolve().parents[1]


def compose_config(*overrides: str):
    """The config `python run.py OVERRIDES` would run with (without Hydra's run directory)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One cache for the session: the embedded data and dense starts are made once, as in a sweep."""
    return tmp_path_factory.mktemp("gblr-cache")
