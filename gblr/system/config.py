"""Where the repository and its Hydra configs are, and the config a run with given overrides gets.

The configs are not package data: they stay in the checkout's ``configs/`` (an editable install,
as requirements.txt makes, keeps the package in the checkout), next to ``run.py`` which reads them.
Hydra is imported only by ``compose``, so that ``run.py --help`` (gblr.run.help) stays fast.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "configs"


def compose(*overrides: str):
    """The config ``python run.py OVERRIDES`` would run with (without Hydra's run directory)."""
    from hydra import compose as compose_hydra, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose_hydra("config", overrides=list(overrides))
