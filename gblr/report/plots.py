"""Figures: the metric against relative MACs, the learned GBLR allocation per layer, the learned
GBLR block layout. Each ``*_figure`` function returns the figure (or None), each ``plot_*`` one
writes it. Figures are drawn on matplotlib.figure.Figure, not pyplot, so importing this module
leaves the caller's matplotlib backend alone and no figure stays open.

Legends name weight types in words (``WEIGHT_NAMES``, the one mapping), and a point with a single
seed has no error bar: the title or its legend entry says "1 seed, no error bars".
"""
import textwrap
from collections import Counter
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gblr.report.collect import CONVENTIONS, METRICS, budget_mode, groups_of, layer_site
from gblr.report.stats import allocation
from gblr.report.tables import show

WEIGHT_NAMES = {"dense": "dense", "lowrank": "low-rank", "monarch": "Monarch", "gblr": "GBLR", "blast": "BLAST"}  # config name -> words
MARKERS = [("s", 7), ("^", 10), ("v", 8.5), ("o", 7), ("D", 5.5), ("P", 5)]  # shrinking, so coinciding points stay visible
ONE_SEED = "1 seed, no error bars"
UNIFORM = "uniform allocation (budget × dense MACs)"
MAX_LISTED = 6  # the layout figure lists at most this many distinct component extents per layer


def arm_label(weight: str, mode: str) -> str:
    """A legend's name of a weight type and its variant, in words: "GBLR" (the global budget),
    "GBLR (uniform budget)", "GBLR (annealed from 3x)", "low-rank (calibrated)", "dense (fine-tuned)"."""
    name = WEIGHT_NAMES.get(weight, weight)
    if weight == "dense":
        return f"{name} (fine-tuned)"
    parts = [] if mode == "-" else mode.split(", ")
    if weight == "gblr" and parts:
        parts = parts[1:] if parts[0] == "global" else [f"{parts[0]} budget"] + parts[1:]
    return name + (f" ({', '.join(parts)})" if parts else "")


def seeds_phrase(counts) -> str:
    """What a panel's points show, from their numbers of seeds: "mean ± std over 5 seeds" (or
    "over 3–5 seeds"), "1 seed, no error bars" where every point has one; never "over 1 seed"."""
    multi = sorted({n for n in counts if n > 1})
    if not multi:
        return ONE_SEED
    span = f"{multi[0]}" if multi[0] == multi[-1] else f"{multi[0]}–{multi[-1]}"
    return f"mean ± std over {span} seeds" + ("; " + ONE_SEED + " where the legend says so" if 1 in counts else "")


# --- the metric against relative MACs -----------------------------------------------------------

def plot_metric(rows, starts, metric: str, conv: str, path: Path) -> bool:
    """Write ``metric_figure`` to ``path``; False (nothing written) without rows of ``metric``."""
    fig = metric_figure(rows, starts, metric, conv)
    if fig is not None:
        fig.savefig(path, dpi=130)
    return fig is not None


def metric_figure(rows, starts, metric: str, conv: str) -> Figure | None:
    """``metric`` against relative MACs in convention ``conv`` (in % of dense), one panel per
    model/data, one line per weight type and variant; None without rows of ``metric``."""
    groups = groups_of(r for r in rows if r["metric"] == metric)
    if not groups:
        return None
    fig = Figure(figsize=(6.5 * len(groups) + 2.5, 4.6), layout="constrained")
    for ax, group in zip(fig.subplots(1, len(groups), squeeze=False)[0], groups):
        table = [r for r in rows if (r["model"], r["data"]) == group]
        drawn = [r for r in table if r[f"flops_{conv}"] is not None]
        start = starts.get(group)
        draw_arms(ax, drawn, conv, all_single=all(r["n_seeds"] == 1 for r in table))
        if start:
            draw_start(ax, start)
        clip_outliers(ax, drawn, start, conv)
        ax.set(xlabel=f"relative MACs, {CONVENTIONS[conv]} (% of dense; 1 MAC = 2 FLOPs)", ylabel=METRICS[metric])
        ax.set_title(f"{group[0]} on {group[1]} ({seeds_phrase([r['n_seeds'] for r in table])})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return fig


def draw_arms(ax, rows, conv: str, all_single: bool) -> None:
    """One line per (weight, variant) of ``rows``, error bars (± std) only at points with more
    than one seed; a line with single-seed points says so in its legend entry (unless the title
    says it for every point, ``all_single``)."""
    for i, (weight, mode) in enumerate(dict.fromkeys((r["weight"], r["budget_mode"]) for r in rows)):
        line = sorted((r for r in rows if (r["weight"], r["budget_mode"]) == (weight, mode)), key=lambda r: r[f"flops_{conv}"])
        x, y = [100 * r[f"flops_{conv}"] for r in line], [r["mean"] for r in line]
        single = [f"{x:.0f}%" for x, r in zip(x, line) if r["n_seeds"] == 1]
        label = arm_label(weight, mode)
        if single and not all_single:
            label += f" [{ONE_SEED}]" if len(single) == len(line) else f" [1 seed at {', '.join(single)}: no error bars]"
        marker, size = MARKERS[i % len(MARKERS)]
        [drawn] = ax.plot(x, y, marker=marker, markersize=size, linestyle="--" if mode == "uniform" else "-", label=label)
        bars = [(x, r["mean"], r["std"]) for x, r in zip(x, line) if r["n_seeds"] > 1 and r["std"] is not None]
        if bars:
            ax.errorbar(*zip(*bars), fmt="none", ecolor=drawn.get_color(), capsize=3)


def draw_start(ax, start: dict) -> None:
    """The dense start as a dotted line, its ± std as a band (none with a single seed)."""
    spread = "; 1 seed" if start["n_seeds"] == 1 else f", {start['n_seeds']} seeds"
    ax.axhline(start["mean"], color="gray", linestyle=":", label=f"dense start ({show(start['mean'], start['std'])}{spread})")
    if start["std"]:
        ax.axhspan(start["mean"] - start["std"], start["mean"] + start["std"], color="gray", alpha=0.12)


def clip_outliers(ax, rows, start, conv: str) -> None:
    """Where a far outlier would squash the other points, limit the y range to the rest (with
    their error bars and the dense start) and list the outliers in one note instead."""
    values = sorted([r["mean"] for r in rows] + ([start["mean"]] if start else []))
    if not values:
        return
    q1, q3 = values[len(values) // 4], values[3 * len(values) // 4]
    spread = max(q3 - q1, 0.01 * abs(q3))
    if q1 - 3 * spread <= values[0] and values[-1] <= q3 + 3 * spread:
        return
    keep = lambda v: q1 - 3 * spread <= v <= q3 + 3 * spread  # noqa: E731
    ends = [e for r in rows if keep(r["mean"]) for e in (r["mean"] - (r["std"] or 0), r["mean"] + (r["std"] or 0))]
    ends += [v for v in values if keep(v)]
    pad = 0.08 * (max(ends) - min(ends)) + 1e-9
    lo, hi = min(ends) - pad, max(ends) + pad
    ax.set_ylim(lo, hi)
    off = sorted((r for r in rows if not lo <= r["mean"] <= hi), key=lambda r: r[f"flops_{conv}"])
    note = "off the scale: " + "; ".join(f"{arm_label(r['weight'], r['budget_mode'])} {r['mean']:.3g} at "
                                         f"{100 * r[f'flops_{conv}']:.0f}%" for r in off)
    ax.text(0.99, 0.02, note, transform=ax.transAxes, ha="right", va="bottom", fontsize=8,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})


# --- the learned allocation ---------------------------------------------------------------------

def plot_allocation(results, path: Path) -> str | None:
    """Write ``allocation_figure`` to ``path``: None, or why nothing was written."""
    fig = allocation_figure(results)
    if fig is None:
        return "no GBLR run with the global budget"
    fig.savefig(path, dpi=130)
    return None


def allocation_figure(results) -> Figure | None:
    """Learned GBLR MACs per token (thousands) per layer type and depth, one panel per model/data
    and global budget, the uniform allocation as gray dotted lines; None without such runs."""
    groups = {g: allocation([r for r in results if (r["model"], r["data"]) == g]) for g in groups_of(results)}
    groups = {g: a for g, a in groups.items() if a[0]}
    if not groups:
        return None
    ncols = max(len(alloc) for alloc, _ in groups.values())
    fig = Figure(figsize=(4.2 * ncols + 2.4, 3.6 * len(groups)), layout="constrained")
    for row, (group, (alloc, dense)) in zip(fig.subplots(len(groups), ncols, squeeze=False), groups.items()):
        for ax, budget in zip(row, alloc):
            seeds = len({r["seed"] for r in results if (r["model"], r["data"]) == group and r["weight"] == "gblr"
                         and budget_mode(r) == "global" and float(r["budget"]) == budget})
            draw_allocation(ax, alloc[budget], dense, budget)
            ax.set_title(f"{group[0]} on {group[1]}, GBLR budget {budget:g}, "
                         + ("1 seed" if seeds == 1 else f"mean over {seeds} seeds"), fontsize=9)
        for ax in row[len(alloc):]:
            ax.axis("off")
        handles = {h.get_label(): h for ax in row for h in ax.get_lines() if not h.get_label().startswith("_")}
        row[-1].legend(handles.values(), handles.keys(), loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8,
                       title="layer type")
    fig.suptitle("Learned GBLR MACs per layer type and block", fontsize=11)
    return fig


def draw_allocation(ax, cells: dict, dense: dict, budget: float) -> None:
    """One line per layer type over the depths it has, and one gray dotted line per distinct
    uniform allocation (budget × a type's dense MACs), named by the types it is for."""
    depths = sorted({d for _, d in cells})
    for i, kind in enumerate(dense):
        marker, size = MARKERS[(i + 1) % len(MARKERS)]
        mine = [d for d in depths if (kind, d) in cells]
        ax.plot(mine, [cells[kind, d] / 1e3 for d in mine], marker=marker, markersize=size, color=f"C{i}", label=kind)
    for level in sorted(set(dense.values())):
        ax.axhline(budget * level / 1e3, color="gray", linestyle=":", linewidth=1, label=UNIFORM)
        ax.annotate(", ".join(k for k, n in dense.items() if n == level), (0.5, budget * level / 1e3),
                    xycoords=("axes fraction", "data"), fontsize=6.5, color="dimgray", ha="center", va="bottom",
                    bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 0.5})
    top = max([*cells.values(), *(budget * n for n in dense.values())]) / 1e3
    ax.set(xlabel="block (depth)", ylabel="MACs per token (thousands)", xticks=depths, ylim=(0, 1.12 * top))
    ax.grid(alpha=0.3)


# --- the learned layout -------------------------------------------------------------------------

def plot_layout(results, path: Path) -> str | None:
    """Write ``layout_figure`` to ``path``: None, or why nothing was written."""
    fig, why = layout_figure(results)
    if fig is not None:
        fig.savefig(path, dpi=130)
    return why


def layout_figure(results) -> tuple[Figure | None, str | None]:
    """(figure, None), or (None, why not): how many components cover each weight entry (rows =
    output, columns = input) of the GBLR layers at the middle depth of one run (the first
    model/data, middle budget, lowest seed), read from its checkpoint.pt, each component's extent
    listed where there are few distinct ones.
    Small panels, one shared colour scale and the extents listed keep it readable for the embedded
    tiny models; it is not drawn when every entry of every layer is covered equally often (each
    component full width or empty), since it then shows a flat square per layer and says nothing."""
    runs = [r for r in results if r["weight"] == "gblr" and budget_mode(r) == "global"
            and (Path(r["_folder"]) / "checkpoint.pt").exists()]
    if not runs:
        return None, "no GBLR run with the global budget and a checkpoint.pt"
    runs = [r for r in runs if (r["model"], r["data"]) == (runs[0]["model"], runs[0]["data"])]
    budgets = sorted({r["budget"] for r in runs})
    run = min((r for r in runs if r["budget"] == budgets[len(budgets) // 2]), key=lambda r: r["seed"])
    depth = max(layer_site(layer["name"])[0] for layer in run["layers"]) // 2
    layers = layer_layouts(run, depth)
    if all(layer["flat"] for layer in layers):
        return None, f"every component of the GBLR layers at block {depth} covers its whole matrix or nothing (a flat picture)"
    ncols = min(3, len(layers))
    nrows = -(-len(layers) // ncols)
    fig = Figure(figsize=(2.9 * ncols + 1.0, 3.3 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    top = max(1, max(int(layer["covered"].max()) for layer in layers))  # one colour per count, 0 (uncovered) included
    cmap = matplotlib.colormaps["viridis"].resampled(top + 1)
    for ax, layer in zip(axes, layers):
        image = ax.imshow(layer["covered"], cmap=cmap, vmin=-0.5, vmax=top + 0.5, aspect="auto", interpolation="nearest")
        draw_layout_panel(ax, layer)
    for ax in axes[len(layers):]:
        ax.axis("off")
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="components covering the entry", ticks=MaxNLocator(integer=True))
    fig.suptitle(f"Learned GBLR block layout: {run['model']} on {run['data']}, block {depth}, budget {run['budget']:g}, "
                 f"seed {run['seed']}", fontsize=10)
    return fig, None


def draw_layout_panel(ax, layer: dict) -> None:
    """A layer's title (type, shape, MACs) and, for few components, each one's extent."""
    n_out, n_in = layer["shape"]
    ax.set_title(f"{layer['site']} ({n_out}×{n_in})\n{layer['macs']:,} MACs/token = {layer['macs'] / (n_out * n_in):.0%} "
                 "of dense", fontsize=8.5)
    xlabel = "input index"
    extents = Counter(layer["extents"]).most_common()
    if len(extents) <= MAX_LISTED:
        listed = ", ".join(f"{n} × {a}%×{b}%" for (a, b), n in extents)
        xlabel += "\n" + textwrap.fill(f"{len(layer['extents'])} components (rows × columns): {listed}", 44)
    ax.set_xlabel(xlabel, fontsize=7.5)
    ax.set_ylabel("output index", fontsize=7.5)
    ax.tick_params(labelsize=7)


def layer_layouts(run: dict, depth: int) -> list[dict]:
    """The GBLR layers of ``run`` at ``depth``, read from its checkpoint.pt: each one's site, shape,
    MACs per token, coverage counts (out, in) and components' extents (% of rows, % of columns)."""
    import torch  # only this figure needs it, and only with a checkpoint

    from gblr.system.files import load_safely  # the report's one import of the rest of gblr
    from gblr.layers.gaudi import boxcar, hard_widths

    state = load_safely(Path(run["_folder"]) / "checkpoint.pt", what="checkpoint", mmap=True)["model"]
    layouts = []
    for layer in (layer for layer in run["layers"] if layer_site(layer["name"])[0] == depth):
        (n_out, n_in), name = layer["shape"], layer["name"]
        widths, locations, rank = state[f"{name}.widths"], state[f"{name}.locations"], state[f"{name}.U"].shape[2]
        covered = boxcar(widths[0], locations[0], n_out).T @ boxcar(widths[1], locations[1], n_in)  # (K, out)^T (K, in)
        a, b = hard_widths(widths[0], n_out), hard_widths(widths[1], n_in)
        layouts.append({"site": layer_site(name)[1], "shape": (n_out, n_in), "covered": covered.numpy(),
                        "macs": int(torch.minimum(rank * (a + b), a * b).sum()),
                        "flat": bool(covered.min() == covered.max()),
                        "extents": [(round(100 * int(x) / n_out), round(100 * int(y) / n_in)) for x, y in zip(a, b)]})
    return layouts
