"""The layout's promises: layers are the ground floor, tasks come from config, not from strings."""
import ast
import re
from pathlib import Path

import pytest
import torch

import gblr
from gblr import tasks
from gblr.system.config import compose

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


# The floors: a package imports only packages on lower floors (and itself). layers and system are the
# ground floor; gblr/__init__.py (the library's names, imported lazily) stands above everything.
FLOORS = {"layers": 0, "system": 0, "data": 1, "structure": 1, "tasks": 2, "run": 3, "report": 4}


def gblr_modules() -> dict[str, Path]:
    """{dotted module name: file} of every module of the package (a package's __init__ as the package)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def gblr_imports(path: Path, known: dict) -> set[str]:
    """The gblr modules ``path`` imports, each resolved to a module of ``known`` (from a.b import c: a.b.c
    when that is a module, else a.b)."""
    tree, names = ast.parse(path.read_text()), set()
    for name in imported_modules(path):
        if name.split(".")[0] == "gblr":
            names.add(name)
    for node in ast.walk(tree):  # from gblr.x import y, where y is a module
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gblr") and not node.level:
            names |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
    resolved = set()
    for name in names:
        while name not in known and "." in name:
            name = name.rsplit(".", 1)[0]
        resolved.add(name)
    return resolved


def test_every_module_lives_in_a_subpackage_with_a_floor():
    modules = gblr_modules()
    loose = [name for name in modules if name.count(".") == 1 and name.split(".")[1] not in FLOORS]
    assert not loose, f"modules outside the floors {sorted(FLOORS)}: {loose}"
    assert set(FLOORS) <= {name.split(".")[1] for name in modules if name.count(".") >= 1}


def test_each_package_imports_only_itself_and_the_floors_below():
    modules = gblr_modules()
    assert len(list((PACKAGE / "layers").glob("*.py"))) >= 7
    for name, path in modules.items():
        if name == "gblr":
            continue
        floor, home = FLOORS[name.split(".")[1]], name.split(".")[1]
        for other in gblr_imports(path, modules) - {"gblr"}:
            there = other.split(".")[1]
            assert there == home or FLOORS[there] < floor, f"{name} (floor {floor}) imports {other} (floor {FLOORS[there]})"


def test_layers_import_nothing_from_the_rest_of_gblr():
    modules = gblr_modules()
    for name in [n for n in modules if n.startswith(("gblr.layers", "gblr.system"))]:
        outside = {m for m in gblr_imports(modules[name], modules) if m.split(".")[1] != name.split(".")[1]}
        assert not outside, f"{name} imports {outside}"


def test_no_module_imports_a_private_name_of_another():
    files = [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "scripts").glob("*.py"), PACKAGE.parent / "run.py"]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("gblr")):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, f"{path.name} imports {private} from {node.module}"


def test_the_import_graph_has_no_cycle():
    modules = gblr_modules()
    graph = {name: gblr_imports(path, modules) - {name} for name, path in modules.items()}
    graph["gblr"] = set()  # the package's lazy names are resolved on use, after every module is loaded
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join([*trail, name])
        state[name] = "open"
        for other in sorted(graph[name]):
            visit(other, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])


# What names a model family in code: its libraries, its classes, its preset names as strings.
FAMILY_LIBRARIES = ("timm", "transformers")
FAMILY_WORDS = re.compile(r"VisionTransformer|GPT2|Conv1D|PreTrainedModel|Llama|GPTNeoX|Mixer|Attention\b")
FAMILY_STRINGS = ("vit", "vit_base", "vit_tiny", "gpt2", "gpt2_tiny", "timm", "transformers")


def code_without_docs(path: Path) -> tuple[set[str], set[str], set[str]]:
    """(modules imported, identifiers and attribute names used, string constants outside docstrings) of a file."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
               and id(n) not in docstrings}
    return imported_modules(path), names, strings


def test_no_family_branch_outside_the_tasks():
    """A model family is one file of gblr/tasks/: the layers, the structure, the run and the report never
    import a model library, name a family's classes or compare with a preset's name."""
    for package in ("layers", "structure", "run", "report"):
        for path in (PACKAGE / package).rglob("*.py"):
            modules, names, strings = code_without_docs(path)
            assert not {m.split(".")[0] for m in modules} & set(FAMILY_LIBRARIES), f"{path} imports a model library"
            assert not [n for n in names if FAMILY_WORDS.search(n)], f"{path} names a family's class"
            assert not strings & set(FAMILY_STRINGS), f"{path} compares with a family's name"


def test_each_family_is_one_file():
    """Each registered family's class lives in its own module of gblr/tasks/."""
    from gblr.structure.family import FAMILIES

    homes = [family.__module__ for family in FAMILIES]
    assert len(homes) == len(set(homes)) >= 2
    assert all(home.startswith("gblr.tasks.") for home in homes)


def test_no_weight_type_is_named_outside_the_layers_and_its_own_checks():
    """What differs between weight types is the layer's (gblr.layers); the run machinery asks the layer."""
    for path in [*(PACKAGE / "run").glob("*.py")]:
        source = path.read_text().replace('getLogger("gblr")', "")
        for kind in ('"gblr"', '"lowrank"', '"monarch"', '"blast"', "'gblr'", "'lowrank'", "'monarch'", "'blast'"):
            assert kind not in source, f"{path.name} names the weight type {kind}"


# Every model x data combination the README lists, with the task each must get.
COMBINATIONS = [("vit_tiny", "digits", tasks.ImageClassification), ("vit_tiny", "imagenet", tasks.ImageClassification),
                ("vit_base", "imagenet", tasks.ImageClassification), ("vit_base", "digits", tasks.ImageClassification),
                ("gpt2_tiny", "pydoc", tasks.CausalLM), ("gpt2", "wikitext103", tasks.CausalLM),
                ("gpt2", "pydoc", tasks.CausalLM), ("gpt2_tiny", "wikitext103", tasks.CausalLM)]


@pytest.mark.parametrize("weight", ["dense", "lowrank", "monarch", "gblr", "blast"])
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
