"""Finding and reading finished runs: which folders are runs, which results are usable (and why
the others are skipped), and what a result is: its metric, its arm (weight type and variant), the
row of a table it belongs to.

A result is one run's results.json (gblr.run.runner.run). Its metric is whichever of ``top1``
(validation top-1 accuracy, %) or ``ppl`` (validation perplexity) it holds, so vision and language
runs need no model-specific code here. Relative MACs are fractions of dense (1.0 = dense; 1 MAC =
2 FLOPs) in three conventions: ``replaced`` (the replaced layers), ``model`` (the whole forward
pass) and ``paper`` (the Gaudi-GBLR paper's, None where it has none).
"""
import json
from pathlib import Path

WEIGHTS, MODES = ["dense", "lowrank", "monarch", "gblr", "blast"], ["-", "global", "uniform", "penalty"]
METRICS = {"top1": "validation top-1 accuracy (%)", "ppl": "validation perplexity (lower is better)"}
CONVENTIONS = {"replaced": "replaced layers", "model": "whole model", "paper": "paper convention"}
# The files any of which marks a folder as a run's (finished, failed, interrupted or just started);
# not gblr.run.folder.RUN_FILES, the files a run writes.
RUN_MARKERS = ("results.json", "error.txt", "checkpoint.pt", ".hydra")
FREE_KEYS = ("seed", "budget", "weight", "out_dir", "resume", "cache_dir", "device", "logger", "dry_run")  # may differ in a table
REQUIRED = {"model", "data", "weight", "budget", "seed", "metrics", "flops"}  # what a result must hold to be read


def load_run(folder: Path) -> tuple[dict | None, str | None]:
    """(result, None) for a usable run folder, else (None, why it is skipped)."""
    path = folder / "results.json"
    if not path.exists():
        return None, why_no_results(folder)
    try:
        result = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return None, f"partial results.json ({error})"
    missing = REQUIRED - set(result if isinstance(result, dict) else {})
    if missing:
        return None, f"results.json lacks {', '.join(sorted(missing))}"
    if result.get("dry_run"):
        return None, "dry run (no training, no metrics)"
    if not result.get("completed"):
        return None, "not completed (resume=true continues it)"
    if metric_of(result) is None:
        return None, "results.json has neither a top1 nor a ppl metric"
    return result, None


def why_no_results(folder: Path) -> str:
    """Why a run folder has no results.json: its error's last line, an interruption, or not yet."""
    if (folder / "error.txt").exists():
        lines = [line.strip() for line in (folder / "error.txt").read_text(errors="replace").splitlines()]
        return "failed: " + next((line for line in reversed(lines) if line), "empty error.txt")
    if (folder / "checkpoint.pt").exists():
        return "unfinished: checkpoint.pt but no results.json (interrupted, or still running)"
    return "no results.json (still running, or stopped before its first epoch)"


def run_folders(top: Path) -> list[Path]:
    """The folders under ``top`` holding any of RUN_MARKERS (a Hydra folder's insides excluded), sorted."""
    return sorted({p.parent for name in RUN_MARKERS for p in top.rglob(name) if ".hydra" not in p.parent.parts})


def collect(dirs) -> tuple[list[dict], list[tuple[str, str]]]:
    """Every usable result under ``dirs`` (with its ``_folder``), and the (folder, reason) skipped."""
    results, skipped, seen, first = [], [], set(), {}
    for top in map(Path, dirs):
        if not top.is_dir():
            skipped.append((str(top), "not a folder"))
            continue
        for folder in run_folders(top):
            if folder.resolve() in seen:
                continue
            seen.add(folder.resolve())
            result, reason = load_run(folder)
            if result is not None:
                key = row_key(result) + (result["seed"],)
                if key in first:  # averaging it in would count one seed twice
                    result, reason = None, f"duplicate of {first[key]} (same model, data, weight, mode, budget, seed)"
                first.setdefault(key, folder)
            if result is None:
                skipped.append((str(folder), reason))
            else:
                results.append({**result, "_folder": str(folder)})
    return results, skipped


def metric_of(result: dict) -> str | None:
    """The metric a result holds, "top1" (%) or "ppl", read from its metrics; None if neither."""
    return next((m for m in METRICS if m in result.get("metrics", {})), None)


def budget_mode(result: dict) -> str:
    """The arm of a run beside its weight type and budget, e.g. "global, frozen" or "calibrated": for
    GBLR how it spread its budget over layers (default "global"), then "frozen" when its structure
    did not learn, "fit init" (or "monarch init") when it did not start from the low-rank
    projection, "annealed from Nx" when its budget was cut from N times the budget while it trained; for every type
    "global ranks" when the ranks were allocated model-wide and "calibrated" when the projection
    saw the data; "-" for a plain run."""
    weight = result.get("config", {}).get("weight", {})
    train = result.get("config", {}).get("train", {})
    parts = []
    if result["weight"] == "gblr":
        parts.append(weight.get("budget_mode", "global"))
        if weight.get("learn_structure") is False or train.get("structure_lr") == 0:
            parts.append("frozen")
        if (init := (weight.get("options") or {}).get("init")) not in (None, "lowrank"):
            parts.append(f"{init} init")
        if weight.get("anneal"):
            parts.append(f"annealed from {weight['anneal']['factor']:g}x")
    if weight.get("allocation", "uniform") == "global":
        parts.append("global ranks")
    if (weight.get("calibration") or {}).get("batches"):
        parts.append("calibrated")
    return ", ".join(parts) or "-"


def row_key(result: dict) -> tuple:
    """(model, data, weight, budget mode, budget): the runs of one table row differ only in seed."""
    return result["model"], result["data"], result["weight"], budget_mode(result), float(result["budget"])


def start_seed(result: dict) -> int:
    """The seed of the dense start a run fine-tuned from (its own seed in results that predate it)."""
    return result.get("start_seed", result["seed"])


def groups_of(items) -> list[tuple[str, str]]:
    """The (model, data) pairs of ``items``, in first-seen order: one table or figure panel each."""
    return list(dict.fromkeys((r["model"], r["data"]) for r in items))


def layer_site(name: str) -> tuple[int, str]:
    """'blocks.3.mlp.fc1' -> (3, 'mlp.fc1'): depth and layer type."""
    parts = name.split(".")
    i = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return (0, name) if i is None else (int(parts[i]), ".".join(parts[i + 1:]))


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def mixed_settings(runs: list[dict]) -> list[str]:
    """'key = a, b' for every config key (except weight, budget, seed, paths) that differs between runs."""
    flat = [{k: json.dumps(v) for k, v in flatten(r.get("config", {})).items() if k.split(".")[0] not in FREE_KEYS} for r in runs]
    values = {k: sorted({f.get(k, "(unset)") for f in flat}) for k in sorted(set().union(*flat))}
    return [f"{k} = {', '.join(v)}" for k, v in values.items() if len(v) > 1]
