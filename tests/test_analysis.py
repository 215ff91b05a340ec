"""gblr.report on hand-made results: skip reasons, aggregation over seeds, the paper's numbers."""
import json

import pytest

from gblr.report.collect import collect, layer_site, load_run, metric_of, mixed_settings
from gblr.report.stats import aggregate, allocation
from gblr.report.tables import load_reference, paper_entry
from gblr.report.write import write_report

REFERENCE = [
    {"setting": "ft", "recipe": "fine-tune", "model": "gpt2", "data": "wt", "weight": "dense", "value": 19.0,
     "paper_flops": [0.999, 1.001]},
    {"setting": "ft", "recipe": "fine-tune", "model": "gpt2", "data": "wt", "weight": "gblr", "budget_mode": ["global"],
     "value": 19.2, "paper_flops": [0.43, 0.445]},
    {"setting": "ft", "recipe": "fine-tune", "model": "gpt2", "data": "wt", "weight": "lowrank", "value": None,
     "claim": "below GBLR", "paper_flops": [0.43, 0.445]},
    {"setting": "scratch", "recipe": "from-scratch", "model": "gpt2", "data": "wt", "weight": "monarch", "value": 20.0,
     "paper_flops": [0.0, 1.0]},
]


def result(weight="gblr", seed=0, value=20.0, budget=0.3, metric="ppl", mode="global", paper=0.44, **extra):
    """A completed result as gblr.run.runner.run writes it, reduced to what the analysis reads."""
    return {"model": "gpt2", "data": "wt", "weight": weight, "budget": budget, "seed": seed, "completed": True,
            "metrics": {metric: value, f"start_{metric}": 30.0 + seed},
            "flops": {"replaced": budget, "model": budget + 0.1, "paper": paper, "macs": 100 + seed, "dense_macs": 300},
            "config": {"weight": {"budget_mode": mode}}, **extra}


def write(folder, content):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


def test_the_metric_is_read_from_the_result_not_the_model_name():
    assert metric_of(result(metric="top1")) == "top1"  # a "gpt2" model with an accuracy is an accuracy
    assert metric_of(result(metric="ppl")) == "ppl"
    assert metric_of({"metrics": {"loss": 1.0}}) is None


@pytest.mark.parametrize("make, reason", [
    (lambda f: (f / "error.txt").write_text("Traceback\n  ...\nValueError: bad\n\n"), "failed: ValueError: bad"),
    (lambda f: (f / "error.txt").write_text(""), "failed: empty error.txt"),
    (lambda f: (f / "checkpoint.pt").write_bytes(b""), "unfinished: checkpoint.pt but no results.json"),
    (lambda f: None, "no results.json"),
    (lambda f: (f / "results.json").write_text('{"model": "gp'), "partial results.json"),
    (lambda f: (f / "results.json").write_text("[1, 2]"), "results.json lacks budget, data, flops, metrics, model, seed"),
    (lambda f: (f / "results.json").write_text(json.dumps(result(dry_run=True))), "dry run"),
    (lambda f: (f / "results.json").write_text(json.dumps({**result(), "completed": False})), "not completed"),
    (lambda f: (f / "results.json").write_text(json.dumps({**result(), "metrics": {}})), "results.json has neither"),
])
def test_load_run_says_why_a_folder_is_skipped(tmp_path, make, reason):
    make(tmp_path)
    loaded, why = load_run(tmp_path)
    assert loaded is None and why.startswith(reason)


def test_collect_skips_a_second_copy_of_a_seed_and_a_missing_folder(tmp_path):
    write(tmp_path / "a", result(seed=0))
    write(tmp_path / "b", result(seed=0, value=99.0))  # same row and seed: would count seed 0 twice
    write(tmp_path / "c", result(seed=1))
    (tmp_path / "d" / ".hydra").mkdir(parents=True)  # a job that made its Hydra folder and stopped
    results, skipped = collect([tmp_path, tmp_path / "a", tmp_path / "nowhere"])
    assert [r["_folder"] for r in results] == [str(tmp_path / "a"), str(tmp_path / "c")]
    assert dict(skipped) == {str(tmp_path / "b"): f"duplicate of {tmp_path / 'a'} (same model, data, weight, mode, budget, seed)",
                             str(tmp_path / "d"): "no results.json (still running, or stopped before its first epoch)",
                             str(tmp_path / "nowhere"): "not a folder"}


def test_aggregate_takes_mean_and_sample_std_over_seeds_and_sorts_the_rows():
    runs = [result("gblr", 0, 19.0), result("gblr", 1, 21.0, paper=0.42), result("gblr", 2, 23.0, paper=0.45),
            result("gblr", 0, 25.0, mode="uniform"), result("lowrank", 0, 24.0), result("dense", 0, 18.0, budget=1.0, paper=1.0)]
    rows, starts = aggregate(runs, REFERENCE)
    assert [(r["weight"], r["budget_mode"]) for r in rows] == [("dense", "-"), ("lowrank", "-"), ("gblr", "global"),
                                                               ("gblr", "uniform")]
    gblr = rows[2]
    assert (gblr["mean"], gblr["std"]) == (pytest.approx(21.0), pytest.approx(2.0))  # sample std: n - 1
    assert (gblr["n_seeds"], gblr["seeds"], gblr["metric"]) == (3, "0;1;2", "ppl")
    assert gblr["flops_paper"] == pytest.approx((0.44 + 0.42 + 0.45) / 3)
    assert gblr["flops_model"] == pytest.approx(0.4) and gblr["macs"] == 101  # round(mean of 100, 101, 102)
    assert rows[1]["std"] is None  # one seed: no spread to report

    start = starts["gpt2", "wt"]  # seed 0 has four runs, all from one dense start: it counts once
    assert (start["mean"], start["n_seeds"], start["seeds"]) == (pytest.approx(31.0), 3, "0;1;2")
    assert start["std"] == pytest.approx(1.0) and start["flops_paper"] == 1.0


def test_relative_macs_in_the_paper_convention_are_none_if_a_seed_lacks_them():
    rows, _ = aggregate([result(seed=0), result(seed=1, paper=None)], REFERENCE)
    assert rows[0]["flops_paper"] is None and rows[0]["paper"] is None


def test_paper_entries_match_model_weight_mode_and_the_macs_range():
    rows, starts = aggregate([result("gblr", 0, paper=0.43), result("gblr", 0, budget=0.2, paper=0.44, mode="uniform"),
                              result("gblr", 0, budget=0.25, paper=0.446), result("lowrank", 0, paper=0.445),
                              result("monarch", 0, paper=0.44)], REFERENCE)
    by = {(r["weight"], r["budget_mode"], r["budget"]): r for r in rows}
    assert by["gblr", "global", 0.3]["paper_value"] == 19.2  # the range's ends are inside
    assert by["gblr", "uniform", 0.2]["paper"] is None  # the entry is for the global budget only
    assert by["gblr", "global", 0.25]["paper"] is None  # 0.446 is past the range
    assert by["lowrank", "-", 0.3]["paper_value"] == "below GBLR"  # no number: the figure's claim
    assert by["monarch", "-", 0.3]["paper"] is None  # from-scratch numbers are never a fine-tuning row's
    assert starts["gpt2", "wt"]["paper_value"] == 19.0  # the dense start matches whatever its MACs
    assert paper_entry({**rows[0], "model": "vit_base"}, REFERENCE) is None


def test_the_packaged_reference_is_consistent():
    reference = load_reference()
    for entry in reference["entries"]:
        assert entry["setting"] in reference["settings"]
        assert entry["paper_flops"][0] <= entry["paper_flops"][1]
        assert entry["value"] is not None or entry["claim"]


def test_allocation_averages_global_gblr_layers_over_seeds():
    def layers(scale):
        return [{"name": f"transformer.h.{d}.mlp.c_fc", "macs_per_token": scale * (d + 1), "dense_macs_per_token": 3000}
                for d in range(2)]

    runs = [result(seed=0, layers=layers(100)), result(seed=1, layers=layers(300)),
            result(seed=0, mode="uniform", layers=layers(1000)), result("lowrank", layers=layers(1000))]
    alloc, dense = allocation(runs)
    assert alloc == {0.3: {("mlp.c_fc", 0): 200.0, ("mlp.c_fc", 1): 400.0}}
    assert dense == {"mlp.c_fc": 3000}
    assert layer_site("blocks.11.attn.qkv") == (11, "attn.qkv") and layer_site("head") == (0, "head")


def test_mixed_settings_name_the_keys_that_differ_but_not_seed_or_budget():
    runs = [{"config": {"seed": 0, "budget": 0.3, "train": {"epochs": 10, "lr": 1e-3}}},
            {"config": {"seed": 1, "budget": 0.5, "train": {"epochs": 3, "lr": 1e-3}, "extra": True}}]
    assert mixed_settings(runs) == ["extra = (unset), true", "train.epochs = 10, 3"]


def test_write_report_writes_only_the_figures_it_has_data_for(tmp_path):
    (tmp_path / "acc_vs_flops.png").write_bytes(b"stale")  # from an earlier report of vision runs
    runs = [{**result(seed=s, value=20.0 + s), "_folder": str(tmp_path / f"s{s}")} for s in (0, 1)]
    report = write_report(runs, [], tmp_path, flops="paper")
    assert [f.name for f in report["figures"]] == ["ppl_vs_flops.png"]
    assert not (tmp_path / "acc_vs_flops.png").exists()
    assert report["notes"] == ["note: no GBLR run with the global budget: no allocation.png",
                               "note: no GBLR run with the global budget and a checkpoint.pt: no layout.png"]
    assert "| gblr | global | 0.3 | 0.300 | 0.400 | 0.4400 | 20.50 ± 0.71 | – | – | 2 |" in report["markdown"]


def test_paired_differences_pair_by_start_and_seed_and_give_a_t_interval():
    from gblr.report.stats import paired_differences

    # Three pairs; GBLR's perplexity is 1, 2 and 3 below low-rank's: mean -2, sd 1, t(0.975, 2) = 4.303.
    runs = [result("lowrank", seed=s, value=20.0 + s, start_seed=7) for s in range(3)]
    runs += [result("gblr", seed=s, value=20.0 + s - (s + 1), start_seed=7) for s in range(3)]
    runs.append(result("gblr", seed=9, value=0.0, start_seed=7))  # no low-rank partner: not paired
    [row] = paired_differences(runs, "lowrank")
    assert (row["weight"], row["reference"], row["metric"], row["n_pairs"]) == ("gblr", "lowrank", "ppl", 3)
    assert row["mean_difference"] == pytest.approx(-2.0)
    assert row["ci95_high"] - row["mean_difference"] == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-5)
    assert row["verdict"] == "no difference shown"  # -2 +- 2.48 includes 0
    tight = [result("lowrank", seed=s, value=20.0, start_seed=7) for s in range(3)]
    tight += [result("gblr", seed=s, value=18.0 + 0.1 * s, start_seed=7) for s in range(3)]
    assert paired_differences(tight)[0]["verdict"] == "better"  # lower perplexity, interval below 0
    accuracy = [result("lowrank", seed=s, value=90.0, metric="top1") for s in range(3)]
    accuracy += [result("monarch", seed=s, value=80.0 + s, metric="top1") for s in range(3)]
    assert paired_differences(accuracy)[0]["verdict"] == "worse"  # lower accuracy, interval below 0


def test_paired_differences_compare_the_global_budget_with_its_uniform_ablation():
    from gblr.report.stats import paired_differences

    runs = [result("gblr", seed=s, value=10.0 + s, mode=mode) for s in range(4) for mode in ("global", "uniform")]
    [row] = paired_differences(runs, "lowrank")
    assert (row["budget_mode"], row["reference"], row["reference_mode"]) == ("global", "gblr", "uniform")
    assert row["mean_difference"] == 0.0 and row["verdict"] == "no difference shown"


def test_variants_name_the_ablations_and_are_compared_with_their_plain_arm():
    from gblr.report.collect import budget_mode
    from gblr.report.stats import paired_differences

    frozen = {"config": {"weight": {"budget_mode": "global", "learn_structure": False}}}
    calibrated = {"config": {"weight": {"calibration": {"batches": 8}}}}
    assert budget_mode(result("gblr", **frozen)) == "global, frozen"
    assert budget_mode(result("gblr", config={"weight": {}, "train": {"structure_lr": 0}})) == "global, frozen"
    assert budget_mode(result("lowrank", **calibrated)) == "calibrated"
    assert budget_mode(result("lowrank", config={"weight": {"allocation": "global"}})) == "global ranks"
    runs = [result("gblr", seed=s, value=10.0 + s) for s in range(3)]
    runs += [result("gblr", seed=s, value=11.0 + s, **frozen) for s in range(3)]
    runs += [result("lowrank", seed=s, value=12.0 + s) for s in range(3)]
    runs += [result("lowrank", seed=s, value=11.5 + s, **calibrated) for s in range(3)]
    pairs = {(r["weight"], r["budget_mode"], r["reference"], r["reference_mode"]): r["mean_difference"]
             for r in paired_differences(runs, "lowrank")}
    assert pairs == {("gblr", "global", "lowrank", "-"): -2.0, ("gblr", "global, frozen", "lowrank", "-"): -1.0,
                     ("lowrank", "calibrated", "lowrank", "-"): -0.5, ("gblr", "global", "gblr", "global, frozen"): -1.0}


def test_an_annealed_arm_is_compared_with_the_frozen_one_and_has_no_before_fine_tuning_figure():
    from gblr.report.stats import aggregate, paired_differences

    annealed = {"config": {"weight": {"budget_mode": "global", "anneal": {"factor": 3, "epochs": 1}}}}
    frozen = {"config": {"weight": {"budget_mode": "global", "learn_structure": False}}}
    runs = [{**result("gblr", seed=s, value=10.0 + s, **annealed), "metrics": {"ppl": 10.0 + s, "converted_ppl": 5.0}}
            for s in range(3)]
    runs += [result("gblr", seed=s, value=12.0 + s, **frozen) for s in range(3)]
    [row] = [r for r in paired_differences(runs) if r["reference_mode"] == "global, frozen"]
    assert row["budget_mode"] == "global, annealed from 3x" and row["mean_difference"] == -2.0
    rows, _ = aggregate(runs, [])
    assert [r["converted"] for r in rows if r["budget_mode"].endswith("3x")] == [None]  # converted above its budget


def test_legends_name_weight_types_in_words_and_keep_the_variant():
    from gblr.report.plots import arm_label

    assert [arm_label(w, "-") for w in ("lowrank", "monarch")] == ["low-rank", "Monarch"]
    assert arm_label("dense", "-") == "dense (fine-tuned)"
    assert arm_label("gblr", "global") == "GBLR"
    assert arm_label("gblr", "uniform") == "GBLR (uniform budget)"
    assert arm_label("gblr", "global, annealed from 3x") == "GBLR (annealed from 3x)"
    assert arm_label("lowrank", "calibrated") == "low-rank (calibrated)"


def error_bars(ax) -> int:
    """The number of error bars drawn in ``ax`` (one segment each)."""
    return sum(len(c.get_segments()) for c in ax.collections if hasattr(c, "get_segments"))


def test_a_single_seed_is_said_and_has_no_error_bar():
    from gblr.report.plots import metric_figure

    one = [result("lowrank", 0, 22.0, budget=b) for b in (0.2, 0.3)] + [result("gblr", 0, 20.0)]
    rows, starts = aggregate(one, [])
    [ax] = metric_figure(rows, starts, "ppl", "model").axes
    assert "1 seed, no error bars" in ax.get_title() and "±" not in ax.get_title()
    assert error_bars(ax) == 0

    mixed = [result("gblr", s, 20.0 + s) for s in range(3)] + [result("lowrank", 0, 22.0)]
    rows, starts = aggregate(mixed, [])
    [ax] = metric_figure(rows, starts, "ppl", "model").axes
    labels = ax.get_legend_handles_labels()[1]
    assert "GBLR" in labels and "low-rank [1 seed, no error bars]" in labels
    assert "over 3 seeds" in ax.get_title() and "over 1 seed" not in ax.get_title()
    assert error_bars(ax) == 1  # GBLR's three seeds; none at low-rank's single one


def test_the_allocation_legend_shows_exactly_the_lines_drawn():
    from gblr.report.plots import allocation_figure

    def layers(scale):
        return [{"name": f"transformer.h.{d}.{kind}", "macs_per_token": scale * (d + 1) * n, "dense_macs_per_token": n}
                for d in range(2) for kind, n in (("attn.c_attn", 3000), ("mlp.c_fc", 4000), ("mlp.c_proj", 4000))]

    fig = allocation_figure([result(seed=s, layers=layers(0.1 + 0.05 * s)) for s in range(2)])
    [ax] = fig.axes
    legend = ax.get_legend()

    def style(line):
        return line.get_color(), line.get_linestyle(), line.get_marker()

    assert {style(h) for h in legend.legend_handles} == {style(line) for line in ax.get_lines()}
    assert [t.get_text() for t in legend.get_texts()] == ["attn.c_attn", "mlp.c_fc", "mlp.c_proj",
                                                          "uniform allocation (budget × dense MACs)"]
    assert "mean over 2 seeds" in ax.get_title()
