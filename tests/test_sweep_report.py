"""Sweeps and scripts/report.py: a 2-job multirun into a temporary folder, its tables and figures,
crashed and partial jobs, a rerun that skips finished jobs, the paper's numbers beside a matching row."""
import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from gblr.system.config import ROOT

# A one-block, 32-wide ViT on digits, one epoch of dense start and one of fine-tuning.
TINY = ["seed=0", "start.epochs=1", "train.epochs=1", "model.kwargs.depth=1", "model.kwargs.embed_dim=32"]


def load_report():
    spec = importlib.util.spec_from_file_location("report_script", ROOT / "scripts" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def multirun(sweep_dir, cache_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([sys.executable, "run.py", "-m", "weight=lowrank,gblr", *TINY, f"cache_dir={cache_dir}",
                           f"hydra.sweep.dir={sweep_dir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir):
    sweep_dir = tmp_path_factory.mktemp("sweep")
    done = multirun(sweep_dir, cache_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return sweep_dir


def test_report_tables_and_figures(sweep, tmp_path):
    out = tmp_path / "report"
    report = load_report().main([str(sweep), "--out", str(out)])
    assert report["skipped"] == []

    with open(out / "results.csv") as f:
        rows = {row["weight"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"dense start", "lowrank", "gblr"}
    start = json.loads((sweep / "gblr-b0.3-s0" / "results.json").read_text())["metrics"]["start_top1"]
    assert float(rows.pop("dense start")["mean"]) == pytest.approx(start)  # both jobs started from the same model
    for weight, row in rows.items():
        result = json.loads((sweep / f"{weight}-b0.3-s0" / "results.json").read_text())
        assert float(row["mean"]) == pytest.approx(result["metrics"]["top1"])
        assert float(row["flops_replaced"]) == pytest.approx(result["flops"]["replaced"]) and float(row["flops_replaced"]) <= 0.3
        assert float(row["flops_model"]) == pytest.approx(result["flops"]["model"])
        assert (row["metric"], row["budget"], row["n_seeds"], row["std"]) == ("top1", "0.3", "1", "")
    assert rows["gblr"]["budget_mode"] == "global" and rows["lowrank"]["budget_mode"] == "-"

    table = (out / "results.md").read_text()
    assert ("| weight | variant | budget | rel. MACs replaced | rel. MACs model | rel. MACs paper | top-1 accuracy (%) "
            "| before fine-tuning | moved | seeds |") in table
    assert f"| dense start | – | – | 1.000 | 1.000 | – | {start:.2f} | – | – | 1 |" in table
    gblr = json.loads((sweep / "gblr-b0.3-s0" / "results.json").read_text())
    assert f"{gblr['metrics']['converted_top1']:.2f} | {gblr['structure']['moved_share']:.3f} | 1 |" in table
    assert f"| gblr | global | 0.3 | {float(rows['gblr']['flops_replaced']):.3f} |" in table
    assert "Learned GBLR allocation" in table

    for name in ("acc_vs_flops.png", "allocation.png", "layout.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 5000, name
    assert not (out / "ppl_vs_flops.png").exists()  # no language runs, no perplexity figure


def test_report_skips_crashed_partial_and_dry_runs(sweep, tmp_path, capsys):
    extra = tmp_path / "broken"
    (extra / "crashed").mkdir(parents=True)
    (extra / "crashed" / "error.txt").write_text("Traceback (most recent call last):\n  ...\nRuntimeError: out of memory\n")
    (extra / "partial").mkdir()
    text = (sweep / "gblr-b0.3-s0" / "results.json").read_text()
    (extra / "partial" / "results.json").write_text(text[: len(text) // 2])
    (extra / "interrupted").mkdir()
    (extra / "interrupted" / "checkpoint.pt").write_bytes(b"")
    (extra / "dry").mkdir()
    (extra / "dry" / "results.json").write_text(json.dumps({**json.loads(text), "dry_run": True, "seed": 7}))

    report = load_report().main([str(sweep), str(extra), "--out", str(tmp_path / "out")])
    skipped = {os.path.basename(folder): reason for folder, reason in report["skipped"]}
    assert skipped["crashed"] == "failed: RuntimeError: out of memory"
    assert skipped["partial"].startswith("partial results.json")
    assert skipped["interrupted"].startswith("unfinished")
    assert skipped["dry"].startswith("dry run")
    printed = capsys.readouterr().out
    for name in skipped:
        assert f"skipped {extra / name}: {skipped[name]}" in printed
    assert [r["n_seeds"] for r in report["rows"]] == [1, 1]  # the two good runs are all still there
    assert "RuntimeError: out of memory" in (tmp_path / "out" / "results.md").read_text()


def test_rerun_skips_finished_jobs(sweep, cache_dir):
    before = {p: p.stat().st_mtime_ns for p in sweep.glob("*/results.json")}
    assert len(before) == 2
    done = multirun(sweep, cache_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stdout + done.stderr).count("skipping:") == 2
    assert {p: p.stat().st_mtime_ns for p in sweep.glob("*/results.json")} == before


def fake_result(folder, weight, seed, ppl, paper, epochs=10):
    """A minimal completed results.json of GPT-2 small on WikiText-103 (no training involved)."""
    folder.mkdir(parents=True)
    result = {"model": "gpt2", "data": "wikitext103", "weight": weight, "budget": 0.318, "seed": seed, "completed": True,
              "dry_run": False, "metrics": {"ppl": ppl, "start_ppl": 19.5}, "layers": [],
              "flops": {"replaced": 0.318, "model": 0.5, "paper": paper, "macs": 1, "dense_macs": 2},
              "config": {"weight": {"kind": weight, "budget_mode": "global"}, "train": {"epochs": epochs}}}
    (folder / "results.json").write_text(json.dumps(result))


def test_paper_number_beside_a_matching_row(tmp_path):
    fake_result(tmp_path / "lowrank-s0", "lowrank", 0, 19.0, 0.4375)
    fake_result(tmp_path / "lowrank-s1", "lowrank", 1, 20.0, 0.4375)
    fake_result(tmp_path / "monarch-s0", "monarch", 0, 21.0, 0.30)  # not the paper's 43.75%: no paper number
    fake_result(tmp_path / "gblr-s0", "gblr", 0, 19.1, 0.4375, epochs=3)
    report = load_report().main([str(tmp_path)])
    rows = {r["weight"]: r for r in report["rows"]}
    assert rows["lowrank"]["paper_value"] == 19.48 and rows["gblr"]["paper_value"] == 19.24
    assert rows["monarch"]["paper"] is None
    table = (tmp_path / "results.md").read_text()
    assert "| 19.50 ± 0.71 | – | – | 2 | 19.48 (gpt2_wikitext103_ft) |" in table  # mean ± sample std of 19 and 20
    assert "train.epochs = 10, 3" in table  # runs made with different settings are flagged
