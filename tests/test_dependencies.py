"""Every third-party package the code imports is declared in pyproject.toml (runtime, or the test extra)."""
import ast
import re
import sys
import tomllib

from gblr.system.config import ROOT

# import name -> distribution name, where they differ
DISTRIBUTIONS = {"PIL": "pillow", "sklearn": "scikit-learn", "hydra": "hydra-core", "hydra_plugins": "hydra-submitit-launcher"}


def imports(paths) -> set[str]:
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    local = {"gblr", *(p.stem for p in ROOT.glob("scripts/*.py"))}  # a script may import its sibling
    return {name for name in names if name not in sys.stdlib_module_names and name not in local}


def declared(requirements) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_every_import_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime, test = declared(project["dependencies"]), declared(project["optional-dependencies"]["test"])
    code = [*ROOT.glob("gblr/**/*.py"), *ROOT.glob("scripts/*.py"), ROOT / "run.py"]
    used = {DISTRIBUTIONS.get(name, name).lower().replace("_", "-") for name in imports(code)}
    assert {"torch", "timm", "transformers", "datasets", "wandb", "submitit", "safetensors"} <= used
    assert used - runtime == set(), "imported by the package but not in pyproject's dependencies"
    assert "pytest" in test and "pytest" not in runtime  # a test-only requirement is the test extra
    used_by_tests = {DISTRIBUTIONS.get(n, n).lower().replace("_", "-") for n in imports(ROOT.glob("tests/*.py"))}
    assert used_by_tests - runtime - test == set(), "imported by the tests but declared nowhere"
    assert "-e .[test]" in (ROOT / "requirements.txt").read_text()  # one command installs all of it
