"""Tables: the paper's numbers (reference.json) and which row each belongs beside, CSV files and
results.md (a table per model/data, paired differences, the learned GBLR allocation)."""
import csv
import json
from importlib import resources
from pathlib import Path

from gblr.report.collect import METRICS, groups_of, mixed_settings


def load_reference() -> dict:
    """The paper's numbers: {"settings": {setting: description}, "entries": [entry, ...]}."""
    return json.loads(resources.files("gblr.report").joinpath("reference.json").read_text())


def paper_entry(row: dict, reference: list[dict], is_start: bool = False) -> dict | None:
    """The paper's entry this row reproduces: same model, data, weight and mode, and (but for the
    dense start) relative MACs in the paper convention within the entry's range; or None."""
    def flops_match(e):
        return is_start or (row["flops_paper"] is not None and e["paper_flops"][0] <= row["flops_paper"] <= e["paper_flops"][1])

    return next((e for e in reference if e["recipe"] == "fine-tune" and flops_match(e)
                 and (e["model"], e["data"], e["weight"]) == (row["model"], row["data"], row["weight"])
                 and row["budget_mode"] in e.get("budget_mode", [row["budget_mode"]])), None)


def match_paper(rows: list[dict], starts: dict, reference: list[dict]) -> None:
    """Set each row's (and dense start's) "paper" entry, "paper_value" (its value, or its claim
    where the paper gives only a figure) and "paper_setting"; None where no entry matches."""
    for row, is_start in [(r, False) for r in rows] + [(s, True) for s in starts.values()]:
        e = row["paper"] = paper_entry(row, reference, is_start)
        row["paper_value"] = e and (e["value"] if e["value"] is not None else e["claim"])
        row["paper_setting"] = e and e["setting"]


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


def paired_table(paired: list[dict]) -> list[str]:
    """Markdown lines of ``paired_differences`` rows (one model/data)."""
    lines = ["| budget | weight | against | metric | pairs | difference, mean [95% CI] | verdict |", "|---|---|---|---|---|---|---|"]
    for p in paired:
        arm = p["weight"] + ("" if p["budget_mode"] == "-" else f" ({p['budget_mode']})")
        ref = p["reference"] + ("" if p["reference_mode"] == "-" else f" ({p['reference_mode']})")
        lines.append(f"| {p['budget']:g} | {arm} | {ref} | {p['metric']} | {p['n_pairs']} | {p['mean_difference']:+.2f} "
                     f"[{p['ci95_low']:+.2f}, {p['ci95_high']:+.2f}] | {p['verdict']} |")
    return lines


def results_table(table: list[dict], start: dict | None, runs: list[dict]) -> list[str]:
    """Markdown lines of one model/data's rows (the dense start first, where there is one), with a
    paper column where any row matches one of the paper's numbers."""
    with_paper = any(r["paper"] for r in table)
    head = ["weight", "variant", "budget", "rel. MACs replaced", "rel. MACs model", "rel. MACs paper",
            METRICS[next(r for r in table if r is not start)["metric"]].replace("validation ", ""), "before fine-tuning", "moved", "seeds"] \
        + ["paper"] * with_paper
    lines = [f"## {table[0]['model']} on {table[0]['data']}", "", runs[0].get("data_description") or "", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        is_start = r is start
        cells = ["dense start" if is_start else r["weight"], r["budget_mode"].replace("-", "–"),
                 "–" if is_start else f"{r['budget']:g}", f"{r['flops_replaced']:.3f}", f"{r['flops_model']:.3f}",
                 "–" if r["flops_paper"] is None else f"{r['flops_paper']:.4f}", show(r["mean"], r["std"]),
                 "–" if r.get("converted") is None else f"{r['converted']:.2f}",
                 "–" if r.get("moved_share") is None else f"{r['moved_share']:.3f}", str(r["n_seeds"])]
        lines.append("| " + " | ".join(cells + [paper_cell(r["paper"])] * with_paper) + " |")
    return lines


def allocation_table(alloc: dict, dense: dict) -> list[str]:
    """Markdown lines of the learned GBLR allocation (``stats.allocation``) at the middle budget."""
    if not alloc:
        return []
    budget = list(alloc)[len(alloc) // 2]
    depths = sorted({d for _, d in alloc[budget]})
    lines = ["", f"Learned GBLR allocation at global budget {budget:g} (MACs per token, mean over seeds; "
             "as the paper's Table 3):", "", "| layer | " + " | ".join(f"block {d}" for d in depths) + " | dense |",
             "|" + "---|" * (len(depths) + 2)]
    return lines + [f"| {kind} | " + " | ".join(f"{alloc[budget].get((kind, d), 0):,.0f}" for d in depths) + f" | {n:,} |"
                    for kind, n in dense.items()]


def markdown(rows, starts, results, skipped, settings, figures, paired=(), allocations=None) -> str:
    """results.md: a table per model/data with the dense start and the paper's numbers, warnings
    about mixed settings, paired differences, the learned GBLR allocation (``allocations``:
    {(model, data): stats.allocation of its runs}), the figures and the skipped runs."""
    lines = ["# Results", "", "Relative MACs (1 MAC = 2 FLOPs) in three conventions: **replaced** = MACs of the replaced layers / "
             "their dense MACs (what `budget` targets); **model** = the whole forward pass / the dense model's; **paper** = the "
             "Gaudi-GBLR paper's convention (– where it has none). Metrics: mean ± sample std over seeds; the dense start is "
             "the model every run of its seed fine-tuned from.", ""]
    for group in groups_of(rows):
        runs = [r for r in results if (r["model"], r["data"]) == group]
        table = ([starts[group]] if group in starts else []) + [r for r in rows if (r["model"], r["data"]) == group]
        lines += results_table(table, starts.get(group), runs)
        if mixed := mixed_settings(runs):
            lines += ["", "**Warning: these runs differ in settings other than weight, budget and seed:** " + "; ".join(mixed)]
        lines += [""] + [f"- paper, {s}: {settings[s]} (gblr/report/reference.json)"
                         for s in dict.fromkeys(r["paper_setting"] for r in table if r["paper"])]
        if mine := [p for p in paired if (p["model"], p["data"]) == group]:
            lines += ["", "Paired differences (the same dense start and data order; arm minus reference; for ppl "
                      "and nll lower is better; \"better\" or \"worse\" only where the 95% interval excludes 0):", ""]
            lines += paired_table(mine)
        lines += allocation_table(*(allocations or {}).get(group, ({}, {})))
        lines.append("")
    lines += ["## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures] + [""]
    lines += ["## Skipped runs", ""] + ([f"- `{folder}`: {reason}" for folder, reason in skipped] or ["none"])
    return "\n".join(lines) + "\n"
