"""The whole report of a set of results: results.csv, runs.csv, paired.csv, results.md and the figures."""
from pathlib import Path

from gblr.report.collect import CONVENTIONS, budget_mode, groups_of, metric_of
from gblr.report.plots import plot_allocation, plot_layout, plot_metric
from gblr.report.stats import aggregate, allocation, paired_differences
from gblr.report.tables import load_reference, markdown, write_csv

FIGURES = {"top1": "acc_vs_flops.png", "ppl": "ppl_vs_flops.png"}  # the metric figures' files
RESULT_COLUMNS = ["model", "data", "weight", "budget_mode", "budget", "flops_replaced", "flops_model", "flops_paper", "metric",
                  "mean", "std", "n_seeds", "seeds", "macs", "dense_macs", "eval_mode", "paper_value", "paper_setting"]
RUN_COLUMNS = ["model", "data", "weight", "budget_mode", "budget", "seed", "metric", "value", "start",
               "flops_replaced", "flops_model", "flops_paper", "time_s", "folder"]
PAIRED_COLUMNS = ["model", "data", "budget", "weight", "budget_mode", "reference", "reference_mode",
                  "metric", "n_pairs", "mean_difference", "ci95_low", "ci95_high", "verdict"]


def write_report(results: list[dict], skipped: list[tuple[str, str]], out: Path, flops: str = "model",
                 reference: dict | None = None, reference_weight: str = "lowrank") -> dict:
    """Write results.csv, runs.csv, paired.csv (``paired_differences`` against ``reference_weight``),
    results.md and the figures for ``results`` (from ``collect``) into ``out``; ``flops`` is the
    convention on the metric figures' x axis. Returns rows, starts
    (see ``aggregate``), skipped, figures (paths written), notes (what was left out, and why),
    markdown (results.md's text) and paired."""
    reference = load_reference() if reference is None else reference
    out.mkdir(parents=True, exist_ok=True)
    rows, starts = aggregate(results, reference["entries"])
    write_csv(out / "results.csv", [{**s, "weight": "dense start"} for s in starts.values()] + rows, RESULT_COLUMNS)
    write_csv(out / "runs.csv", [run_row(r) for r in results], RUN_COLUMNS)
    figures, notes = write_figures(rows, starts, results, out, flops)
    paired = paired_differences(results, reference_weight)
    write_csv(out / "paired.csv", paired, PAIRED_COLUMNS)
    allocations = {group: allocation([r for r in results if (r["model"], r["data"]) == group]) for group in groups_of(results)}
    text = markdown(rows, starts, results, skipped, reference["settings"], figures, paired, allocations)
    (out / "results.md").write_text(text)
    return {"rows": rows, "starts": starts, "skipped": skipped, "figures": figures, "notes": notes, "markdown": text,
            "paired": paired}


def run_row(result: dict) -> dict:
    """A row of runs.csv: one run's arm, seed, metric value, dense start and relative MACs."""
    m = metric_of(result)
    return {**result, "budget_mode": budget_mode(result), "metric": m, "value": result["metrics"][m],
            "start": result["metrics"].get(f"start_{m}"), "folder": result["_folder"],
            **{f"flops_{c}": result["flops"].get(c) for c in CONVENTIONS}}


def write_figures(rows, starts, results, out: Path, flops: str) -> tuple[list[Path], list[str]]:
    """Draw every figure there is data for into ``out`` and remove the others (stale, from an
    earlier report of other runs); (the figures written, notes on those left out and why)."""
    figures, notes = [], []
    for metric, name in FIGURES.items():
        conv = flops if all(r[f"flops_{flops}"] is not None for r in rows if r["metric"] == metric) else "model"
        if conv != flops:
            notes.append(f"note: some {metric} rows have no relative MACs in the {flops} convention: {name} uses 'model'")
        if plot_metric(rows, starts, metric, conv, out / name):
            figures.append(out / name)
    for name, plot in (("allocation.png", plot_allocation), ("layout.png", plot_layout)):
        if (why := plot(results, out / name)) is None:
            figures.append(out / name)
        else:
            notes.append(f"note: {why}: no {name}")
    for stale in {out / n for n in (*FIGURES.values(), "allocation.png", "layout.png")} - set(figures):
        stale.unlink(missing_ok=True)
    return figures, notes
