"""`python run.py --help` is our page from the configs' table of contents, and neither it nor shell
completion imports torch (which alone takes seconds)."""
import os
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from gblr.run.help import page
from gblr.system.config import ROOT


def imported(stderr: str) -> set[str]:
    """Top-level package names in `python -X importtime` output."""
    return {m.group(1).split(".")[0] for m in re.finditer(r"^import time:.*\|\s+(\S+)\s*$", stderr, re.M)}


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_is_our_page_and_imports_neither_torch_nor_hydra(flag):
    done = subprocess.run([sys.executable, "-X", "importtime", "run.py", flag], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == page()
    modules = imported(done.stderr)
    assert "gblr" in modules and not modules & {"torch", "hydra", "timm", "transformers"}


def test_the_page_lists_every_group_option_and_default():
    text, config = page(), OmegaConf.load(ROOT / "configs" / "config.yaml")
    for group in ("model", "weight", "data", "logger", "experiment", "sweep", "launcher"):
        assert re.search(rf"^  {group}$", text, re.M), group
        for option in (ROOT / "configs" / group).glob("*.yaml"):
            assert re.search(rf"^    [* ] {option.stem}( |$)", text, re.M), option
    assert re.search(r"^    \* vit_tiny ", text, re.M) and re.search(r"^    \* gblr ", text, re.M)  # the defaults
    assert f"  budget={config.budget}" in text and f"  train.epochs={config.train.epochs}" in text
    assert "structure" not in re.findall(r"^  (\w+)$", text, re.M)  # internal (structure@weight.options)


def test_shell_completion_does_not_import_torch():
    env = {**os.environ, "COMP_LINE": "python run.py weig", "COMP_POINT": "22"}
    done = subprocess.run([sys.executable, "-X", "importtime", "run.py", "-sc", "query=bash"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "weight=" in done.stdout
    assert "hydra" in imported(done.stderr) and "torch" not in imported(done.stderr)
