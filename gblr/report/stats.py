"""The analysis of finished runs behind scripts/report.py: collect results.json files, aggregate
them over seeds, match the paper's numbers (gblr/report/reference.json), write tables and figures.

A result is one run's results.json (gblr.runner.run). Its metric is whichever of ``top1``
(validation top-1 accuracy, %) or ``ppl`` (validation perplexity) it holds, so vision and language
runs need no model-specific code here. Relative MACs are fractions of dense (1.0 = dense; 1 MAC =
2 FLOPs) in three conventions: ``replaced`` (the replaced layers), ``model`` (the whole forward
pass) and ``paper`` (the Gaudi-GBLR paper's, None where it has none).
"""
import csv
import json
import statistics
from collections import defaultdict
from importlib import resources
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

WEIGHTS, MODES = ["dense", "lowrank", "monarch", "gblr"], ["-", "global", "uniform", "penalty"]
METRICS = {"top1": "validation top-1 accuracy (%)", "ppl": "validation perplexity (lower is better)"}
CONVENTIONS = {"replaced": "replaced layers", "model": "whole model", "paper": "paper convention"}
MARKERS = [("s", 7), ("^", 10), ("v", 8.5), ("o", 7), ("D", 5.5), ("P", 5)]  # shrinking, so coinciding points stay visible
RUN_FILES = ("results.json", "error.txt", "checkpoint.pt", ".hydra")  # any of them makes a folder a run
FREE_KEYS = ("seed", "budget", "weight", "out_dir", "resume", "cache_dir", "device", "logger", "dry_run")  # may differ in a table
FIGURES = {"top1": "acc_vs_flops.png", "ppl": "ppl_vs_flops.png"}


def load_reference() -> dict:
    """The paper's numbers: {"settings": {setting: description}, "entries": [entry, ...]}."""
    return json.loads(resources.files("gblr.report").joinpath("reference.json").read_text())


# --- collecting ----------------------------------------------------------------------------------

def load_run(folder: Path) -> tuple[dict | None, str | None]:
    """(result, None) for a usable run folder, else (None, why it is skipped)."""
    path = folder / "results.json"
    if not path.exists():
        if (folder / "error.txt").exists():
            lines = [line.strip() for line in (folder / "error.txt").read_text(errors="replace").splitlines()]
            return None, "failed: " + next((line for line in reversed(lines) if line), "empty error.txt")
        if (folder / "checkpoint.pt").exists():
            return None, "unfinished: checkpoint.pt but no results.json (interrupted, or still running)"
        return None, "no results.json (still running, or stopped before its first epoch)"
    try:
        result = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return None, f"partial results.json ({error})"
    missing = {"model", "data", "weight", "budget", "seed", "metrics", "flops"} - set(result if isinstance(result, dict) else {})
    if missing:
        return None, f"results.json lacks {', '.join(sorted(missing))}"
    if result.get("dry_run"):
        return None, "dry run (no training, no metrics)"
    if not result.get("completed"):
        return None, "not completed (resume=true continues it)"
    if metric_of(result) is None:
        return None, "results.json has neither a top1 nor a ppl metric"
    return result, None


def collect(dirs) -> tuple[list[dict], list[tuple[str, str]]]:
    """Every usable result under ``dirs`` (with its ``_folder``), and the (folder, reason) skipped."""
    results, skipped, seen, first = [], [], set(), {}
    for top in map(Path, dirs):
        if not top.is_dir():
            skipped.append((str(top), "not a folder"))
            continue
        for folder in sorted({p.parent for name in RUN_FILES for p in top.rglob(name) if ".hydra" not in p.parent.parts}):
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


def groups_of(items) -> list[tuple[str, str]]:
    """The (model, data) pairs of ``items``, in first-seen order: one table or figure panel each."""
    return list(dict.fromkeys((r["model"], r["data"]) for r in items))


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


# --- aggregating ---------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the std is None for a single value."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def converted(result: dict, metric: str) -> float | None:
    """The metric right after the conversion, before fine-tuning; None where the run has none, or
    where it was converted above its budget (``weight.anneal``): that model is not at the budget."""
    if (result.get("config", {}).get("weight", {}) or {}).get("anneal"):
        return None
    return result["metrics"].get(f"converted_{metric}")


def mean_of(values: list) -> float | None:
    """The mean, or None when any value is missing (a run that does not record it)."""
    return None if not values or None in values else statistics.fmean(values)


def aggregate(results: list[dict], reference: list[dict]) -> tuple[list[dict], dict]:
    """(rows, starts): one row per row_key, sorted; starts[(model, data)]: the dense start's row.

    A row holds the metric's mean and std over seeds ("mean", "std"), the relative MACs of each
    convention averaged over seeds ("flops_replaced", "flops_model", "flops_paper"; fractions of
    dense), MACs per example ("macs", "dense_macs") and the matching paper entry of ``reference``
    ("paper", "paper_value", "paper_setting"; None where none matches), the metric right after the
    conversion, before fine-tuning ("converted") and GBLR's moved share of its structure's MACs
    ("moved_share"), each a mean over seeds or None where a run lacks it.
    """
    by_key = defaultdict(list)
    for r in results:
        by_key[row_key(r)].append(r)
    rows = []
    for (model, data, weight, mode, budget), runs in by_key.items():
        metric = metric_of(runs[0])
        mean, std = mean_std([r["metrics"][metric] for r in runs])
        paper = [r["flops"].get("paper") for r in runs]
        rows.append({"model": model, "data": data, "weight": weight, "budget_mode": mode, "budget": budget, "metric": metric,
                     "mean": mean, "std": std, "n_seeds": len(runs), "seeds": ";".join(sorted(str(r["seed"]) for r in runs)),
                     "flops_replaced": statistics.fmean(r["flops"]["replaced"] for r in runs),
                     "flops_model": statistics.fmean(r["flops"]["model"] for r in runs),
                     "flops_paper": None if None in paper else statistics.fmean(paper),
                     "macs": round(statistics.fmean(r["flops"]["macs"] for r in runs)),
                     "dense_macs": runs[0]["flops"]["dense_macs"], "eval_mode": runs[0]["metrics"].get("eval_mode"),
                     "converted": mean_of([converted(r, metric) for r in runs]),
                     "moved_share": mean_of([(r.get("structure") or {}).get("moved_share") for r in runs])})
    rows.sort(key=lambda r: (r["model"], r["data"], WEIGHTS.index(r["weight"]) if r["weight"] in WEIGHTS else 9,
                             MODES.index(r["budget_mode"]) if r["budget_mode"] in MODES else 9, r["budget_mode"], r["budget"]))
    starts = {}
    for model, data in groups_of(rows):
        by_seed = {}  # every run of a start seed starts from the same dense model
        for r in results:
            if (r["model"], r["data"]) == (model, data) and f"start_{metric_of(r)}" in r["metrics"]:
                by_seed.setdefault(start_seed(r), r["metrics"][f"start_{metric_of(r)}"])
        if by_seed:
            dense = [r["flops_paper"] for r in rows if (r["model"], r["data"], r["weight"]) == (model, data, "dense")]
            mean, std = mean_std(list(by_seed.values()))
            starts[model, data] = {"model": model, "data": data, "weight": "dense", "budget_mode": "-", "budget": 1.0,
                                   "metric": next(r["metric"] for r in rows if (r["model"], r["data"]) == (model, data)),
                                   "mean": mean, "std": std, "n_seeds": len(by_seed), "seeds": ";".join(sorted(map(str, by_seed))),
                                   "flops_replaced": 1.0, "flops_model": 1.0,
                                   "flops_paper": dense[0] if dense else None}
    for row, is_start in [(r, False) for r in rows] + [(s, True) for s in starts.values()]:
        e = row["paper"] = paper_entry(row, reference, is_start)
        row["paper_value"] = e and (e["value"] if e["value"] is not None else e["claim"])
        row["paper_setting"] = e and e["setting"]
    return rows, starts


def arm_label(weight: str, mode: str) -> str:
    """A figure legend's name of a weight type and its variant, e.g. "gblr (global budget, fit init)"
    or "lowrank (calibrated)"."""
    if weight == "gblr":
        spread, _, init = mode.partition(", ")
        return f"gblr ({spread} budget{', ' + init if init else ''})"
    if weight == "dense":
        return "dense (fine-tuned)"
    return weight if mode == "-" else f"{weight} ({mode})"


def start_seed(result: dict) -> int:
    """The seed of the dense start a run fine-tuned from (its own seed in results that predate it)."""
    return result.get("start_seed", result["seed"])


LOWER_IS_BETTER = {"ppl", "nll"}


def ci95(differences: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t confidence interval (n >= 2)."""
    from scipy.stats import t

    n = len(differences)
    return statistics.fmean(differences), float(t.ppf(0.975, n - 1)) * statistics.stdev(differences) / n ** 0.5


def paired_differences(results: list[dict], reference: str = "lowrank") -> list[dict]:
    """Each weight type (and GBLR budget mode) against ``reference`` at the same model, data and
    budget, paired by (start seed, fine-tune seed): the same dense start and the same data order.

    One row per comparison and metric (the run's metric, and the validation NLL where runs hold
    one): the mean difference (arm - reference), its 95% t-interval, the number of pairs and a
    verdict, "better" / "worse" where the interval excludes 0, else "no difference shown". The
    ablations are compared too (``extra_comparisons``). Comparisons with fewer than 2 pairs are
    left out.
    """
    arms = defaultdict(lambda: defaultdict(dict))  # (model, data, budget) -> (weight, mode) -> pair -> metrics
    for r in results:
        arms[r["model"], r["data"], float(r["budget"])][r["weight"], budget_mode(r)][start_seed(r), r["seed"]] = r["metrics"]
    rows = []
    for (model, data, budget), by_arm in arms.items():
        comparisons = [(arm, (reference, "-")) for arm in by_arm if arm != (reference, "-")] + extra_comparisons(by_arm)
        comparisons = [(arm, ref) for arm, ref in dict.fromkeys(comparisons) if arm in by_arm and ref in by_arm]
        for arm, ref in comparisons:
            pairs = sorted(set(by_arm[arm]) & set(by_arm[ref]))
            metrics = [m for m in (*METRICS, "nll") if pairs and all(m in by_arm[x][p] for x in (arm, ref) for p in pairs)]
            for metric in metrics if len(pairs) >= 2 else []:
                d = [by_arm[arm][p][metric] - by_arm[ref][p][metric] for p in pairs]
                mean, half = ci95(d)
                good = -mean if metric in LOWER_IS_BETTER else mean
                verdict = "no difference shown" if abs(mean) <= half else "better" if good > 0 else "worse"
                rows.append({"model": model, "data": data, "budget": budget, "weight": arm[0], "budget_mode": arm[1],
                             "reference": ref[0], "reference_mode": ref[1], "metric": metric, "n_pairs": len(pairs),
                             "mean_difference": mean, "ci95_low": mean - half, "ci95_high": mean + half,
                             "verdict": verdict})
    rows.sort(key=lambda r: (r["model"], r["data"], r["budget"], WEIGHTS.index(r["weight"]) if r["weight"] in WEIGHTS else 9,
                             r["reference"], r["metric"]))
    return rows


def paper_entry(row: dict, reference: list[dict], is_start: bool = False) -> dict | None:
    """The paper's entry this row reproduces: same model, data, weight and mode, and (but for the
    dense start) relative MACs in the paper convention within the entry's range; or None."""
    def flops_match(e):
        return is_start or (row["flops_paper"] is not None and e["paper_flops"][0] <= row["flops_paper"] <= e["paper_flops"][1])

    return next((e for e in reference if e["recipe"] == "fine-tune" and flops_match(e)
                 and (e["model"], e["data"], e["weight"]) == (row["model"], row["data"], row["weight"])
                 and row["budget_mode"] in e.get("budget_mode", [row["budget_mode"]])), None)


def layer_site(name: str) -> tuple[int, str]:
    """'blocks.3.mlp.fc1' -> (3, 'mlp.fc1'): depth and layer type."""
    parts = name.split(".")
    i = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return (0, name) if i is None else (int(parts[i]), ".".join(parts[i + 1:]))


def allocation(runs: list[dict]) -> tuple[dict, dict]:
    """({budget: {(type, depth): MACs per token, mean over seeds}}, {type: dense MACs per token})
    of the GBLR runs with the global budget."""
    cells, dense = defaultdict(lambda: defaultdict(list)), {}
    for r in runs:
        if r["weight"] == "gblr" and budget_mode(r) == "global":
            for layer in r.get("layers", []):
                depth, kind = layer_site(layer["name"])
                cells[float(r["budget"])][kind, depth].append(layer["macs_per_token"])
                dense[kind] = layer["dense_macs_per_token"]
    return {b: {k: statistics.fmean(v) for k, v in c.items()} for b, c in sorted(cells.items())}, dense


# --- tables --------------------------------------------------------------------------------------

def show(mean, std, digits=2) -> str:
    """'mean ± std', or 'mean' without a std."""
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def paper_cell(e: dict | None) -> str:
    """A paper entry as a table cell: its value (or claim) and setting."""
    if e is None:
        return "–"
    value = f"{e['value']:g}" if e["value"] is not None else e["claim"]
    return f"{value} ({e['setting']}{'; ' + e['note'] if e.get('note') else ''})"


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """``columns`` of ``rows``, None as an empty cell."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: "" if row.get(k) is None else row[k] for k in columns} for row in rows)


def extra_comparisons(arms) -> list[tuple[tuple, tuple]]:
    """The ablation pairs among ``arms`` ((weight, variant) keys), each (arm, the arm it ablates):
    GBLR's global budget against its uniform ablation, learned against frozen structure, an
    annealed budget against the plain GBLR run and against the frozen structure, the budgeted fit's
    start against the plain GBLR run, and a calibrated arm against the same arm plain."""
    pairs = [(("gblr", "global"), ("gblr", "uniform"))]
    for weight, variant in arms:
        parts = variant.split(", ")
        if "frozen" in parts:
            pairs.append(((weight, without(parts, "frozen")), (weight, variant)))
        for part in parts:
            if part == "calibrated" or part == "fit init" or part.startswith("annealed"):
                pairs.append(((weight, variant), (weight, without(parts, part))))
            if part.startswith("annealed"):  # learned while cut to the budget, against the structure frozen at it
                rest = without(parts, part).split(", ")
                pairs.append(((weight, variant), (weight, ", ".join(rest[:1] + ["frozen"] + rest[1:]))))
    return pairs


def without(parts: list[str], part: str) -> str:
    """The variant of ``parts`` less ``part`` ("-" when nothing is left)."""
    return ", ".join(p for p in parts if p != part) or "-"


def paired_table(paired: list[dict]) -> list[str]:
    """Markdown lines of ``paired_differences`` rows (one model/data)."""
    lines = ["| budget | weight | against | metric | pairs | difference, mean [95% CI] | verdict |", "|---|---|---|---|---|---|---|"]
    for p in paired:
        arm = p["weight"] + ("" if p["budget_mode"] == "-" else f" ({p['budget_mode']})")
        ref = p["reference"] + ("" if p["reference_mode"] == "-" else f" ({p['reference_mode']})")
        lines.append(f"| {p['budget']:g} | {arm} | {ref} | {p['metric']} | {p['n_pairs']} | {p['mean_difference']:+.2f} "
                     f"[{p['ci95_low']:+.2f}, {p['ci95_high']:+.2f}] | {p['verdict']} |")
    return lines


def markdown(rows, starts, results, skipped, settings, figures, paired=()) -> str:
    """results.md: a table per model/data with the dense start and the paper's numbers, warnings
    about mixed settings, the learned GBLR allocation, the figures and the skipped runs."""
    lines = ["# Results", "", "Relative MACs (1 MAC = 2 FLOPs) in three conventions: **replaced** = MACs of the replaced layers / "
             "their dense MACs (what `budget` targets); **model** = the whole forward pass / the dense model's; **paper** = the "
             "Gaudi-GBLR paper's convention (– where it has none). Metrics: mean ± sample std over seeds; the dense start is "
             "the model every run of its seed fine-tuned from.", ""]
    for model, data in groups_of(rows):
        group = [r for r in rows if (r["model"], r["data"]) == (model, data)]
        runs = [r for r in results if (r["model"], r["data"]) == (model, data)]
        table = ([starts[model, data]] if (model, data) in starts else []) + group
        with_paper = any(r["paper"] for r in table)
        head = ["weight", "variant", "budget", "rel. MACs replaced", "rel. MACs model", "rel. MACs paper",
                METRICS[group[0]["metric"]].replace("validation ", ""), "before fine-tuning", "moved", "seeds"] \
            + ["paper"] * with_paper
        lines += [f"## {model} on {data}", "", runs[0].get("data_description") or "", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in table:
            start = r is starts.get((model, data))
            cells = ["dense start" if start else r["weight"], r["budget_mode"].replace("-", "–"),
                     "–" if start else f"{r['budget']:g}", f"{r['flops_replaced']:.3f}", f"{r['flops_model']:.3f}",
                     "–" if r["flops_paper"] is None else f"{r['flops_paper']:.4f}", show(r["mean"], r["std"]),
                     "–" if r.get("converted") is None else f"{r['converted']:.2f}",
                     "–" if r.get("moved_share") is None else f"{r['moved_share']:.3f}", str(r["n_seeds"])]
            lines.append("| " + " | ".join(cells + [paper_cell(r["paper"])] * with_paper) + " |")
        if mixed := mixed_settings(runs):
            lines += ["", "**Warning: these runs differ in settings other than weight, budget and seed:** " + "; ".join(mixed)]
        lines += [""] + [f"- paper, {s}: {settings[s]} (gblr/report/reference.json)"
                         for s in dict.fromkeys(r["paper_setting"] for r in table if r["paper"])]
        mine = [p for p in paired if (p["model"], p["data"]) == (model, data)]
        if mine:
            lines += ["", "Paired differences (the same dense start and data order; arm minus reference; for ppl "
                      "and nll lower is better; \"better\" or \"worse\" only where the 95% interval excludes 0):", ""]
            lines += paired_table(mine)
        alloc, dense = allocation(runs)
        if alloc:
            budget = list(alloc)[len(alloc) // 2]
            depths = sorted({d for _, d in alloc[budget]})
            lines += ["", f"Learned GBLR allocation at global budget {budget:g} (MACs per token, mean over seeds; "
                      "as the paper's Table 3):", "", "| layer | " + " | ".join(f"block {d}" for d in depths) + " | dense |",
                      "|" + "---|" * (len(depths) + 2)]
            lines += [f"| {kind} | " + " | ".join(f"{alloc[budget].get((kind, d), 0):,.0f}" for d in depths) + f" | {n:,} |"
                      for kind, n in dense.items()]
        lines.append("")
    lines += ["## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures] + [""]
    lines += ["## Skipped runs", ""] + ([f"- `{folder}`: {reason}" for folder, reason in skipped] or ["none"])
    return "\n".join(lines) + "\n"


# --- figures -------------------------------------------------------------------------------------
# Figures are drawn on matplotlib.figure.Figure, not pyplot, so importing this module leaves the
# caller's matplotlib backend alone and no figure stays open.

def plot_metric(rows, starts, metric: str, conv: str, path: Path) -> bool:
    """``metric`` against relative MACs in convention ``conv`` (in % of dense), one panel per
    model/data, one line per weight type and budget mode; False (nothing written) without rows."""
    groups = groups_of(r for r in rows if r["metric"] == metric)
    if not groups:
        return False
    fig = Figure(figsize=(6.5 * len(groups) + 2.5, 4.6), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)
    for ax, (model, data) in zip(axes[0], groups):
        group = [r for r in rows if (r["model"], r["data"]) == (model, data) and r[f"flops_{conv}"] is not None]
        for i, (weight, mode) in enumerate(dict.fromkeys((r["weight"], r["budget_mode"]) for r in group)):
            line = sorted((r for r in group if (r["weight"], r["budget_mode"]) == (weight, mode)), key=lambda r: r[f"flops_{conv}"])
            marker, size = MARKERS[i % len(MARKERS)]
            ax.errorbar([100 * r[f"flops_{conv}"] for r in line], [r["mean"] for r in line], yerr=[r["std"] or 0 for r in line],
                        marker=marker, markersize=size, capsize=3, linestyle="--" if mode == "uniform" else "-",
                        label=arm_label(weight, mode))
        if start := starts.get((model, data)):
            ax.axhline(start["mean"], color="gray", linestyle=":", label=f"dense start ({show(start['mean'], start['std'])})")
            if start["std"]:
                ax.axhspan(start["mean"] - start["std"], start["mean"] + start["std"], color="gray", alpha=0.12)
        values = sorted([r["mean"] for r in group] + ([start["mean"]] if start else []))
        q1, q3 = values[len(values) // 4], values[3 * len(values) // 4]
        spread = max(q3 - q1, 0.01 * abs(q3))
        if values[0] < q1 - 3 * spread or values[-1] > q3 + 3 * spread:  # a far outlier would squash the rest
            keep = lambda v: q1 - 3 * spread <= v <= q3 + 3 * spread  # noqa: E731
            # The range covers the kept points with their error bars, and the dense start.
            ends = [e for r in group if keep(r["mean"]) for e in (r["mean"] - (r["std"] or 0), r["mean"] + (r["std"] or 0))]
            ends += [v for v in values if keep(v)]
            pad = 0.08 * (max(ends) - min(ends)) + 1e-9
            lo, hi = min(ends) - pad, max(ends) + pad
            ax.set_ylim(lo, hi)  # the outliers are listed in one note instead, so no labels collide
            off = [r for r in group if not lo <= r["mean"] <= hi]
            note = "off the scale: " + "; ".join(f"{r['weight']} {r['mean']:.3g} at {100 * r[f'flops_{conv}']:.0f}%"
                                                  for r in sorted(off, key=lambda r: r[f"flops_{conv}"]))
            ax.text(0.99, 0.02, note, transform=ax.transAxes, ha="right", va="bottom", fontsize=8,
                    bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
        seeds = max(r["n_seeds"] for r in rows if (r["model"], r["data"]) == (model, data))
        ax.set(xlabel=f"relative MACs, {CONVENTIONS[conv]} (% of dense; 1 MAC = 2 FLOPs)", ylabel=METRICS[metric])
        ax.set_title(f"{model} on {data} (mean ± std over {seeds} seed{'s' * (seeds > 1)})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.savefig(path, dpi=130)
    return True


def plot_allocation(results, path: Path) -> bool:
    """Learned GBLR MACs per token (thousands) per layer type and depth, one panel per model/data
    and global budget, the uniform allocation dotted; False (nothing written) without such runs."""
    groups = {g: allocation([r for r in results if (r["model"], r["data"]) == g]) for g in groups_of(results)}
    groups = {g: a for g, a in groups.items() if a[0]}
    if not groups:
        return False
    ncols = max(len(alloc) for alloc, _ in groups.values())
    fig = Figure(figsize=(4.2 * ncols + 2.2, 3.6 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), ncols, squeeze=False)
    for row, ((model, data), (alloc, dense)) in zip(axes, groups.items()):
        for ax, budget in zip(row, alloc):
            depths = sorted({d for _, d in alloc[budget]})
            for i, kind in enumerate(dense):
                marker, size = MARKERS[(i + 1) % len(MARKERS)]
                ax.plot(depths, [alloc[budget].get((kind, d), 0) / 1e3 for d in depths], marker=marker, markersize=size,
                        color=f"C{i}", label=kind)
                ax.axhline(budget * dense[kind] / 1e3, color=f"C{i}", linestyle=":", linewidth=1)
            ax.set(xlabel="block (depth)", ylabel="MACs per token (thousands)", xticks=depths, ylim=(0, None))
            ax.set_title(f"{model} on {data}, GBLR global budget {budget:g}", fontsize=9)
            ax.grid(alpha=0.3)
        for ax in row[len(alloc):]:
            ax.axis("off")
        handles, labels = row[0].get_legend_handles_labels()
        row[-1].legend(handles + [Line2D([], [], color="gray", linestyle=":")],
                       labels + ["dotted: uniform allocation\n(budget × dense MACs)"],
                       loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, title="layer type")
    fig.suptitle("Learned GBLR MACs per layer (mean over seeds)", fontsize=11)
    fig.savefig(path, dpi=130)
    return True


def plot_layout(results, path: Path) -> bool:
    """How many components cover each weight entry (rows = output, columns = input), for the GBLR
    layers at the middle depth of one run (the first model/data, middle budget, lowest seed), read
    from its checkpoint.pt; False (nothing written) without a global-budget GBLR run that has one."""
    import torch  # only this figure needs it, and only with a checkpoint

    from gblr.files import load_safely
    from gblr.layers.gaudi import boxcar, hard_widths

    runs = [r for r in results if r["weight"] == "gblr" and budget_mode(r) == "global"
            and (Path(r["_folder"]) / "checkpoint.pt").exists()]
    if not runs:
        return False
    runs = [r for r in runs if (r["model"], r["data"]) == (runs[0]["model"], runs[0]["data"])]
    budgets = sorted({r["budget"] for r in runs})
    run = min((r for r in runs if r["budget"] == budgets[len(budgets) // 2]), key=lambda r: r["seed"])
    state = load_safely(Path(run["_folder"]) / "checkpoint.pt", what="checkpoint", mmap=True)["model"]
    depth = max(layer_site(layer["name"])[0] for layer in run["layers"]) // 2
    layers = [layer for layer in run["layers"] if layer_site(layer["name"])[0] == depth]
    fig = Figure(figsize=(3.4 * len(layers) + 0.6, 3.9), layout="constrained")
    axes = fig.subplots(1, len(layers), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        (n_out, n_in), name = layer["shape"], layer["name"]
        widths, locations, rank = state[f"{name}.widths"], state[f"{name}.locations"], state[f"{name}.U"].shape[2]
        covered = boxcar(widths[0], locations[0], n_out).T @ boxcar(widths[1], locations[1], n_in)  # (K, out)^T (K, in)
        a, b = hard_widths(widths[0], n_out), hard_widths(widths[1], n_in)
        macs = int(torch.minimum(rank * (a + b), a * b).sum())
        top = max(1, int(covered.max()))  # one colour per count, 0 (uncovered) included
        image = ax.imshow(covered.numpy(), cmap=matplotlib.colormaps["viridis"].resampled(top + 1), vmin=-0.5,
                          vmax=top + 0.5, aspect="auto", interpolation="nearest")
        fig.colorbar(image, ax=ax, shrink=0.8, label="components covering the entry", ticks=MaxNLocator(integer=True))
        ax.set(xlabel="input index", ylabel="output index")
        ax.set_title(f"{layer_site(name)[1]} ({n_out}×{n_in})\n{macs:,} MACs/token = {macs / (n_out * n_in):.0%} of dense",
                     fontsize=9)
    fig.suptitle(f"Learned GBLR block layout, block {depth} of {run['model']} on {run['data']}, budget {run['budget']:g}, "
                 f"seed {run['seed']} ({Path(run['_folder']).name}/checkpoint.pt)", fontsize=10)
    fig.savefig(path, dpi=130)
    return True


# --- the whole report ----------------------------------------------------------------------------

def write_report(results: list[dict], skipped: list[tuple[str, str]], out: Path, flops: str = "model",
                 reference: dict | None = None, reference_weight: str = "lowrank") -> dict:
    """Write results.csv, runs.csv, paired.csv (``paired_differences`` against ``reference_weight``),
    results.md and the figures for ``results`` (from ``collect``) into ``out``; ``flops`` is the
    convention on the metric figures' x axis. Returns rows, starts
    (see ``aggregate``), skipped, figures (paths written), notes (what was left out, and why) and
    markdown (results.md's text)."""
    reference = load_reference() if reference is None else reference
    out.mkdir(parents=True, exist_ok=True)
    rows, starts = aggregate(results, reference["entries"])
    write_csv(out / "results.csv", [{**s, "weight": "dense start"} for s in starts.values()] + rows,
              ["model", "data", "weight", "budget_mode", "budget", "flops_replaced", "flops_model", "flops_paper", "metric",
               "mean", "std", "n_seeds", "seeds", "macs", "dense_macs", "eval_mode", "paper_value", "paper_setting"])
    write_csv(out / "runs.csv", [{**r, "budget_mode": budget_mode(r), "metric": (m := metric_of(r)), "value": r["metrics"][m],
                                  "start": r["metrics"].get(f"start_{m}"), "folder": r["_folder"],
                                  **{f"flops_{c}": r["flops"].get(c) for c in CONVENTIONS}} for r in results],
              ["model", "data", "weight", "budget_mode", "budget", "seed", "metric", "value", "start",
               "flops_replaced", "flops_model", "flops_paper", "time_s", "folder"])
    figures, notes = [], []
    for metric, name in FIGURES.items():
        conv = flops if all(r[f"flops_{flops}"] is not None for r in rows if r["metric"] == metric) else "model"
        if conv != flops:
            notes.append(f"note: some {metric} rows have no relative MACs in the {flops} convention: {name} uses 'model'")
        if plot_metric(rows, starts, metric, conv, out / name):
            figures.append(out / name)
    for name, plot in (("allocation.png", plot_allocation), ("layout.png", plot_layout)):
        if plot(results, out / name):
            figures.append(out / name)
        else:
            notes.append(f"note: no GBLR run with the global budget{' and a checkpoint.pt' * (plot is plot_layout)}: no {name}")
    for stale in {out / n for n in (*FIGURES.values(), "allocation.png", "layout.png")} - set(figures):
        stale.unlink(missing_ok=True)  # from an earlier report of other runs
    paired = paired_differences(results, reference_weight)
    write_csv(out / "paired.csv", paired, ["model", "data", "budget", "weight", "budget_mode", "reference", "reference_mode",
                                          "metric", "n_pairs", "mean_difference", "ci95_low", "ci95_high", "verdict"])
    text = markdown(rows, starts, results, skipped, reference["settings"], figures, paired)
    (out / "results.md").write_text(text)
    return {"rows": rows, "starts": starts, "skipped": skipped, "figures": figures, "notes": notes, "markdown": text,
            "paired": paired}
