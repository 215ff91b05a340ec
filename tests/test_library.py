"""The library's names (gblr/__init__.py): the README's snippet runs as written; `import gblr` stays light."""
import os
import re
import subprocess
import sys

import pytest

from gblr.system.config import ROOT


def readme_snippet() -> str:
    section = (ROOT / "README.md").read_text().split("## Use it in your own model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_snippet_runs_as_written_and_keeps_the_budget(tmp_path):
    done = subprocess.run([sys.executable, "-c", readme_snippet()], cwd=tmp_path, capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert 0.25 < float(done.stdout.strip().splitlines()[-1]) <= 0.3


def test_import_gblr_loads_no_torch_and_names_resolve_on_use():
    code = ("import sys, gblr; assert 'torch' not in sys.modules; "
            "assert set(gblr.__all__) <= set(dir(gblr)); print(gblr.Budget.__module__, gblr.load.__module__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["gblr.structure.budget", "gblr.run.export"]


def test_an_unknown_name_is_an_attribute_error():
    import gblr

    with pytest.raises(AttributeError, match="has no attribute 'train'"):
        gblr.train
