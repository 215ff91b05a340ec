"""The project's Hydra configs, for code that runs without run.py (tests, notebooks)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"


def compose(*overrides: str):
    """The config `python run.py OVERRIDES` would run with (without Hydra's run directory)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))
