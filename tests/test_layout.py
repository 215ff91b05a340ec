"""The layout's promises: layers are the ground floor, tasks come from config, not from strings."""
import ast
import re
from pathlib import Path

import pytest
import torch

import gblr
from gblr import tasks
from gblr.config import compose

PACKAGE = Path(gblr.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved inside gblr)."""
    tree, package = ast.parse(path.read_text()), ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
    return names


def test_layers_import_nothing_from_the_rest_of_gblr():
    files = sorted((PACKAGE / "layers").glob("*.py"))
    assert len(files) >= 7
    for path in files:
        outside = {name for name in imported_modules(path)
                   if name.split(".")[0] == "gblr" and not name.startswith("gblr.layers")}
        assert not outside, f"{path.name} imports {outside}"


def test_the_runner_never_branches_on_a_model_family():
    source = (PACKAGE / "runner.py").read_text()
    for word in ('"vit"', '"gpt2"', "'vit'", "'gpt2'", "family"):
        assert word not in source


# Every model x data combination the README lists, with the task each must get.
COMBINATIONS = [("vit_tiny", "digits", tasks.ImageClassification), ("vit_tiny", "imagenet", tasks.ImageClassification),
                ("vit_base", "imagenet", tasks.ImageClassification), ("vit_base", "digits", tasks.ImageClassification),
                ("gpt2_tiny", "pydoc", tasks.CausalLM), ("gpt2", "wikitext103", tasks.CausalLM),
                ("gpt2", "pydoc", tasks.CausalLM), ("gpt2_tiny", "wikitext103", tasks.CausalLM)]


@pytest.mark.parametrize("weight", ["dense", "lowrank", "monarch", "gblr"])
@pytest.mark.parametrize("model,data,task_type", COMBINATIONS)
def test_every_listed_combination_composes_into_its_task(model, data, task_type, weight):
    cfg = compose(f"model={model}", f"data={data}", f"weight={weight}")
    task = tasks.build_task(cfg, torch.device("cpu"))
    assert type(task) is task_type and task.metric in ("top1", "ppl")


@pytest.mark.parametrize("model,data", [("vit_tiny", "pydoc"), ("gpt2_tiny", "digits")])
def test_a_model_with_data_of_the_other_family_is_a_clear_error(model, data):
    cfg = compose(f"model={model}", f"data={data}")
    with pytest.raises(ValueError, match=f"takes data=.*got data={data}"):
        tasks.build_task(cfg, torch.device("cpu"))


def test_no_file_cites_documents_outside_the_project():
    root = PACKAGE.parent
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".yaml", ".md", ".sh", ".toml", ".txt")
             and ".git" not in p.parts and "outputs" not in p.parts and "multirun" not in p.parts]
    outside = re.compile("SP" "EC|" "iss" r"ue [0-9]")  # split, so that this file does not match itself
    for path in files:
        assert not outside.search(path.read_text(errors="replace")), path
