"""Statistics over seeds: a table row's mean and sample std, the dense start every run fine-tuned
from, paired differences between arms with Student-t 95% intervals, the learned GBLR allocation."""
import statistics
from collections import defaultdict

from gblr.report.collect import METRICS, MODES, WEIGHTS, budget_mode, groups_of, layer_site, metric_of, row_key, start_seed
from gblr.report.tables import match_paper

LOWER_IS_BETTER = {"ppl", "nll"}


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
    rows = sorted((table_row(key, runs) for key, runs in by_key.items()), key=row_order)
    starts = {group: start for group in groups_of(rows) if (start := dense_start(group, results, rows))}
    match_paper(rows, starts, reference)
    return rows, starts


def table_row(key: tuple, runs: list[dict]) -> dict:
    """The row of ``runs`` (one row_key, one run per seed): means over seeds, see ``aggregate``."""
    model, data, weight, mode, budget = key
    metric = metric_of(runs[0])
    mean, std = mean_std([r["metrics"][metric] for r in runs])
    paper = [r["flops"].get("paper") for r in runs]
    return {"model": model, "data": data, "weight": weight, "budget_mode": mode, "budget": budget, "metric": metric,
            "mean": mean, "std": std, "n_seeds": len(runs), "seeds": ";".join(sorted(str(r["seed"]) for r in runs)),
            "flops_replaced": statistics.fmean(r["flops"]["replaced"] for r in runs),
            "flops_model": statistics.fmean(r["flops"]["model"] for r in runs),
            "flops_paper": None if None in paper else statistics.fmean(paper),
            "macs": round(statistics.fmean(r["flops"]["macs"] for r in runs)),
            "dense_macs": runs[0]["flops"]["dense_macs"], "eval_mode": runs[0]["metrics"].get("eval_mode"),
            "converted": mean_of([converted(r, metric) for r in runs]),
            "moved_share": mean_of([(r.get("structure") or {}).get("moved_share") for r in runs])}


def row_order(row: dict) -> tuple:
    """Rows by model, data, weight type (WEIGHTS' order), budget mode (MODES' order), budget."""
    return (row["model"], row["data"], WEIGHTS.index(row["weight"]) if row["weight"] in WEIGHTS else 9,
            MODES.index(row["budget_mode"]) if row["budget_mode"] in MODES else 9, row["budget_mode"], row["budget"])


def dense_start(group: tuple[str, str], results: list[dict], rows: list[dict]) -> dict | None:
    """The row of the dense models a (model, data) group's runs fine-tuned from, one value per
    start seed (every run of a start seed starts from the same model); None if no run records it."""
    by_seed = {}
    for r in results:
        if (r["model"], r["data"]) == group and f"start_{metric_of(r)}" in r["metrics"]:
            by_seed.setdefault(start_seed(r), r["metrics"][f"start_{metric_of(r)}"])
    if not by_seed:
        return None
    group_rows = [r for r in rows if (r["model"], r["data"]) == group]
    dense = [r["flops_paper"] for r in group_rows if r["weight"] == "dense"]
    mean, std = mean_std(list(by_seed.values()))
    return {"model": group[0], "data": group[1], "weight": "dense", "budget_mode": "-", "budget": 1.0,
            "metric": group_rows[0]["metric"], "mean": mean, "std": std, "n_seeds": len(by_seed),
            "seeds": ";".join(sorted(map(str, by_seed))), "flops_replaced": 1.0, "flops_model": 1.0,
            "flops_paper": dense[0] if dense else None}


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
        for arm, ref in dict.fromkeys(comparisons):
            if arm in by_arm and ref in by_arm:
                rows += [{"model": model, "data": data, "budget": budget, **row}
                         for row in compare(arm, by_arm[arm], ref, by_arm[ref])]
    rows.sort(key=lambda r: (r["model"], r["data"], r["budget"], WEIGHTS.index(r["weight"]) if r["weight"] in WEIGHTS else 9,
                             r["reference"], r["metric"]))
    return rows


def compare(arm: tuple, arm_runs: dict, ref: tuple, ref_runs: dict) -> list[dict]:
    """One row per metric both arms' runs hold (at every shared (start seed, seed) pair): the mean
    paired difference ``arm - ref``, its 95% interval and a verdict; none with fewer than 2 pairs."""
    pairs = sorted(set(arm_runs) & set(ref_runs))
    if len(pairs) < 2:
        return []
    rows = []
    for metric in (m for m in (*METRICS, "nll") if all(m in runs[p] for runs in (arm_runs, ref_runs) for p in pairs)):
        mean, half = ci95([arm_runs[p][metric] - ref_runs[p][metric] for p in pairs])
        good = -mean if metric in LOWER_IS_BETTER else mean
        verdict = "no difference shown" if abs(mean) <= half else "better" if good > 0 else "worse"
        rows.append({"weight": arm[0], "budget_mode": arm[1], "reference": ref[0], "reference_mode": ref[1], "metric": metric,
                     "n_pairs": len(pairs), "mean_difference": mean, "ci95_low": mean - half, "ci95_high": mean + half,
                     "verdict": verdict})
    return rows


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
