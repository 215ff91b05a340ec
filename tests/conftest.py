"""Tests run offline: no hub, no wandb. Configs come from gblr.system.config.compose, paths from gblr.system.config.ROOT."""
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One cache for the session: the embedded data and dense starts are made once, as in a sweep."""
    return tmp_path_factory.mktemp("gblr-cache")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache under HF_HUB_OFFLINE=1, as on an offline cluster node.

    Returns ``put(repo_id, folder)``, which files a folder as the repository's main revision the way
    ``hf download`` leaves it (hub/models--org--name/refs/main + snapshots/<commit>/files).
    """
    import shutil

    import huggingface_hub.constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The libraries read these constants (set from the environment at import) at call time.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def put(repo_id: str, folder) -> None:
        repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
        commit = "0123456789abcdef0123456789abcdef01234567"
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)

    return put


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: results that do not depend on the machine's thread count,
    and no OpenMP threads spinning against other processes on a shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
