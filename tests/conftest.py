"""Tests run offline: no hub, no wandb. Configs come from gblr.config.compose, paths from gblr.config.ROOT."""
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One cache for the session: the embedded data and dense starts are made once, as in a sweep."""
    return tmp_path_factory.mktemp("gblr-cache")
