"""What a run promises (README, Guarantees): its folder's results are its own, one writer at a time,
loading never runs code, caches are verified, failures exit non-zero, bad input fails before compute."""
import json
import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

import gblr.run.runner
import gblr.tasks
from gblr.system.config import ROOT, compose
from gblr.data.pydoc_text import pydoc_tokenizer, pydoc_tokens
from gblr.system.files import BadFile, Busy, entry_record, load_safely, locked
from gblr.run.runner import run

QUICK = ["start.epochs=2", "train.epochs=1", "train.batch_size=128", "weight=lowrank"]


class Planted:
    """A pickle that creates a file when it is loaded unsafely."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_dir):
    """A finished run with train.lr=1e-3, as a sweep job (skip_existing)."""
    out = tmp_path_factory.mktemp("finished")
    cfg = compose(f"cache_dir={cache_dir}", f"out_dir={out}", *QUICK, "train.lr=1e-3")
    return out, run(cfg, skip_existing=True)


def test_a_sweep_rerun_with_the_same_settings_returns_the_stored_result(finished, cache_dir, monkeypatch):
    out, first = finished
    monkeypatch.setattr(gblr.run.runner, "experiment", lambda *a: pytest.fail("a finished run was run again"))
    again = run(compose(f"cache_dir={cache_dir}", f"out_dir={out}", *QUICK, "train.lr=1e-3", "train.num_workers=0",
                        "logger=none"), skip_existing=True)
    assert again["metrics"] == first["metrics"]


@pytest.mark.parametrize("extra", [[], ["resume=true"]])
def test_a_rerun_with_other_train_settings_is_refused_naming_the_keys(finished, cache_dir, extra):
    out, _ = finished
    with pytest.raises(ValueError, match=r"holds another run: .*train\.lr: 0\.001 -> 0\.005.*fresh=true"):
        run(compose(f"cache_dir={cache_dir}", f"out_dir={out}", *QUICK, "train.lr=5e-3", *extra), skip_existing=True)
    assert json.loads((out / "results.json").read_text())["config"]["train"]["lr"] == 1e-3


def test_fresh_true_moves_the_other_run_aside_and_runs_these_settings(tmp_path, finished, cache_dir):
    out, first = finished
    for name in ("results.json", "checkpoint.pt"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    result = run(compose(f"cache_dir={cache_dir}", f"out_dir={tmp_path}", *QUICK, "train.lr=5e-3", "fresh=true"),
                 skip_existing=True)
    assert result["config"]["train"]["lr"] == 5e-3 and result["metrics"] != first["metrics"]
    moved = list(tmp_path.glob("replaced-*/results.json"))
    assert len(moved) == 1 and json.loads(moved[0].read_text())["config"]["train"]["lr"] == 1e-3


def test_a_second_run_into_a_held_folder_is_refused_naming_the_holder(tmp_path, cache_dir):
    with locked(tmp_path / ".lock", what="test"):
        with pytest.raises(Busy, match=rf"run folder {tmp_path} is in use by pid {os.getpid()}"):
            run(compose(f"cache_dir={cache_dir}", f"out_dir={tmp_path}", "dry_run=true"))
    assert not (tmp_path / "results.json").exists()
    run(compose(f"cache_dir={cache_dir}", f"out_dir={tmp_path}", "dry_run=true"))  # free again
    assert (tmp_path / "results.json").exists()


def test_a_planted_pickle_in_a_checkpoint_is_refused_without_running(tmp_path, cache_dir):
    marker = tmp_path / "code-ran"
    torch.save({"model": Planted(marker)}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="checkpoint.pt cannot be loaded safely"):
        run(compose(f"cache_dir={cache_dir}", f"out_dir={tmp_path}", *QUICK, "resume=true"))
    with pytest.raises(BadFile, match="only an unsafe load"):
        load_safely(tmp_path / "checkpoint.pt")
    assert not marker.exists()


def test_a_truncated_checkpoint_is_named_and_fresh_true_moves_it_aside(tmp_path, cache_dir):
    torch.save({"identity": {}, "model": {"w": torch.zeros(1000)}}, tmp_path / "checkpoint.pt")
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # killed mid-copy, a full disk
    with pytest.raises(ValueError, match=rf"run folder {tmp_path} holds another run: checkpoint checkpoint.pt cannot "
                                         r"be loaded safely: .*fresh=true"):
        run(compose(f"cache_dir={cache_dir}", f"out_dir={tmp_path}", "dry_run=true", "resume=true"))
    run(compose(f"cache_dir={cache_dir}", f"out_dir={tmp_path}", "dry_run=true", "fresh=true"))  # not a dead end
    assert (tmp_path / "results.json").exists() and len(list(tmp_path.glob("replaced-*/checkpoint.pt"))) == 1


def test_resume_without_a_checkpoint_says_it_starts_from_the_beginning(tmp_path, cache_dir, caplog):
    run(compose(f"cache_dir={cache_dir}", f"out_dir={tmp_path}", "dry_run=true", "resume=true"))
    assert f"resume=true, but {tmp_path} has no checkpoint.pt: starting from the beginning" in caplog.text


@pytest.mark.parametrize("key", ["out_dir", "cache_dir"])
def test_an_unwritable_folder_fails_before_any_data_is_read(tmp_path, cache_dir, monkeypatch, key):
    def never(*args, **kwargs):
        pytest.fail("data was read before the folders were checked")

    monkeypatch.setattr(gblr.tasks.ImageClassification, "load_data", never)
    monkeypatch.setattr(gblr.run.runner, "train", never)
    (tmp_path / "a-file").write_text("")  # a folder below a file cannot be made, even by root
    folders = {"out_dir": tmp_path / "out", "cache_dir": cache_dir, key: tmp_path / "a-file" / "sub"}
    message = {"out_dir": rf"run folder {tmp_path}/a-file/sub: cannot write in {tmp_path}/a-file/sub",
               "cache_dir": rf"cache_dir '{tmp_path}/a-file/sub' is not writable"}[key]
    with pytest.raises(ValueError, match=message):
        run(compose(*(f"{k}={v}" for k, v in folders.items()), *QUICK))


def test_a_planted_or_corrupt_dense_start_is_trained_again_with_a_warning(tmp_path, caplog):
    cache = tmp_path / "cache"
    settings = [f"cache_dir={cache}", *QUICK, "dry_run=false"]
    first = run(compose(*settings, f"out_dir={tmp_path / 'a'}"))
    [start] = list((cache / "starts").glob("*.pt"))
    marker = tmp_path / "code-ran"
    torch.save({"model": Planted(marker)}, start)  # planted, its record's checksum no longer matches
    second = run(compose(*settings, f"out_dir={tmp_path / 'b'}"))
    assert f"the cached dense start {start} is corrupt" in caplog.text and not marker.exists()
    assert second["metrics"]["start_top1"] == first["metrics"]["start_top1"]
    record = json.loads(entry_record(start).read_text())
    record["key"] = "another key"  # made for other settings
    entry_record(start).write_text(json.dumps(record))
    caplog.clear()
    run(compose(*settings, f"out_dir={tmp_path / 'c'}"))
    assert f"the cached dense start {start} was made for other settings" in caplog.text


def test_a_corrupt_token_cache_or_tokenizer_is_made_again_with_a_warning(tmp_path, caplog):
    tokenizer = pydoc_tokenizer(tmp_path, 300)
    ids, source = pydoc_tokens("validation", tokenizer, tmp_path)
    good = np.array(ids)
    path = source["cache"]
    raw = np.load(path).copy()
    raw[10:20] = (raw[10:20] + 1) % 300  # plausible ids, wrong ones
    np.save(path, raw)
    again, _ = pydoc_tokens("validation", tokenizer, tmp_path)
    assert f"cache entry {path} is corrupt" in caplog.text
    assert np.array_equal(np.array(again), good)
    [tok_file] = list((tmp_path / "pydoc").glob("bpe-300-*/tokenizer.json"))
    tok_file.write_text(tok_file.read_text()[:100])  # truncated
    caplog.clear()
    assert pydoc_tokenizer(tmp_path, 300).to_str() == tokenizer.to_str()
    assert f"cache entry {tok_file} is corrupt" in caplog.text


def test_a_stale_error_file_and_dead_temp_files_are_removed_and_files_are_world_readable(tmp_path, cache_dir):
    (tmp_path / "error.txt").write_text("an old failure")
    (tmp_path / ".results.json.tmp-99999-abcd").write_bytes(b"")
    old = os.umask(0o022)
    try:
        run(compose(f"cache_dir={cache_dir}", f"out_dir={tmp_path / 'x'}", "dry_run=true"))
        run(compose(f"cache_dir={cache_dir}", f"out_dir={tmp_path}", "dry_run=true"))
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "x") == ["results.json"]  # no .lock left
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == 0o755


BAD = [("seed=abc", "seed must be an integer from 0 to 18446744073709551615, got 'abc'"),
       ("seed=1.5", "seed must be an integer"),
       ("train.batch_size=0", "train.batch_size must be an integer >= 1, got 0"),
       ("train.batch_size=-8", "train.batch_size must be an integer >= 1, got -8"),
       ("train.grad_accum=0", "train.grad_accum must be an integer >= 1"),
       ("train.batch_size=96", "train.batch_size (96, the global batch) must be a multiple of train.grad_accum (5)"),
       ("train.lr=nan", "train.lr must be a finite number > 0, got nan"),
       ("start.epochs=0", "start.epochs must be an integer >= 1, got 0"),
       ("train.epochs=-1", "train.epochs must be an integer >= 0 (0 = compress only: convert, evaluate, report), got -1"),
       ("weight.calibration.batches=-1", "weight.calibration.batches must be an integer >= 0, got -1"),
       ("weight.allocation=foo", "weight.allocation must be one of uniform, global, got 'foo'"),
       ("+weight.options.rnak=8", "weight.options ['rnak'] are not options of weight=gblr"),
       ("budget=1e-9", "budget 1e-09 is below one full-width rank-1 component"),
       ("train.batch_size=4096", "train.batch_size must be at most the training set's 1437 examples"),
       ("device=gpu", "device must be auto, cpu, cuda or cuda:N"),
       ("model.pretrained=EMPTY", "is an empty folder")]


@pytest.mark.parametrize("override, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_error_naming_the_key_before_any_training(tmp_path, cache_dir, monkeypatch, override,
                                                                    message):
    monkeypatch.setattr(gblr.run.runner, "train", lambda *a, **k: pytest.fail("trained before the input was checked"))
    (tmp_path / "empty").mkdir()
    extra = ["train.grad_accum=5"] if override == "train.batch_size=96" else []
    cfg = compose(f"cache_dir={cache_dir}", f"out_dir={tmp_path / 'out'}",
                  override.replace("EMPTY", str(tmp_path / "empty")), *extra)
    with pytest.raises(ValueError, match=re.escape(message)):
        run(cfg)
    assert not (tmp_path / "out" / "results.json").exists()


def test_bad_text_input_fails_before_training(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(gblr.run.runner, "train", lambda *a, **k: pytest.fail("trained before the input was checked"))
    with pytest.raises(ValueError, match="data.block_size must be an integer >= 1, got 0"):
        run(compose("model=gpt2_tiny", "data=pydoc", "data.block_size=0", f"out_dir={tmp_path}"))
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text('{"version": "1.0", "truncated')
    with pytest.raises(ValueError, match=f"data.tokenizer folder {folder} cannot be read as a tokenizer"):
        run(compose("model=gpt2_tiny", "data=pydoc", f"data.tokenizer={folder}", f"out_dir={tmp_path / 'o'}",
                    f"cache_dir={cache_dir}"))


def command(*args, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "run.py", *args], cwd=cwd, capture_output=True, text=True, timeout=1800,
                          env=env)


@pytest.mark.e2e
def test_exit_codes_bad_input_stopped_and_a_sweep_with_failed_jobs(tmp_path, cache_dir):
    bad = command(f"out_dir={tmp_path / 'bad'}", "seed=abc")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: seed must be an integer from 0 to 18446744073709551615, got 'abc'"]

    out = tmp_path / "stopped"
    stopped = command(f"out_dir={out}", f"cache_dir={cache_dir}", *QUICK, "train.epochs=2", "train.stop_after=1")
    assert stopped.returncode == 5, stopped.stderr[-2000:]
    assert (out / "checkpoint.pt").exists() and not (out / "results.json").exists()
    assert (out / ".hydra" / "config.yaml").exists() and (out / "run.log").exists()  # logs follow out_dir

    sweep = tmp_path / "sweep"
    failed = command("-m", "weight=lowrank,monarch", "budget=0.0001", "dry_run=true", f"cache_dir={cache_dir}",
                     f"hydra.sweep.dir={sweep}")
    assert failed.returncode == 6, failed.stderr[-2000:]
    assert "2 job(s) of the sweep" in failed.stderr
    assert sorted(p.parent.name for p in sweep.glob("*/error.txt")) == ["lowrank-b0.0001-s0", "monarch-b0.0001-s0"]

    halted = command("-m", "seed=0,1", f"cache_dir={cache_dir}", *QUICK, "train.epochs=2", "train.stop_after=1",
                     f"hydra.sweep.dir={tmp_path / 'halted'}")
    assert halted.returncode == 5, halted.stderr[-2000:]  # a stop ends the whole sweep, not one job
    assert (tmp_path / "halted" / "lowrank-b0.3-s0" / "checkpoint.pt").exists()
    assert not (tmp_path / "halted" / "lowrank-b0.3-s1").exists()


HYDRA_BAD = [("weight=nonexistent", "error: weight=nonexistent: no such option of weight; options: "
                                    + ", ".join(sorted(p.stem for p in (ROOT / "configs" / "weight").glob("*.yaml")))),
             ("budget=[", "error: cannot parse the override 'budget=[' (no viable alternative at input '['); see "
                          "python run.py --help"),
             ("out_dir=LONG", "error: the run folder {long} ({n} characters, a name of 300) is too long for the file "
                              "system (names up to 255 bytes, paths up to 4096): choose a shorter out_dir or "
                              "hydra.sweep.dir")]


@pytest.mark.parametrize("override, line", HYDRA_BAD, ids=["unknown-option", "unparsable", "name-too-long"])
def test_hydras_own_errors_are_one_error_line_and_exit_2(tmp_path, override, line):
    folder = str(tmp_path / ("a" * 300))
    shown = f"{folder[:50]}...{folder[-20:]}"
    done = command(f"out_dir={tmp_path / 'run'}", override.replace("LONG", folder))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [line.format(long=shown, n=len(folder))]
    assert list(tmp_path.iterdir()) == []  # no folder made, nothing written


def held_sweep(sweep, cache_dir, budget="0.3"):
    """A dry-run sweep over lowrank and monarch into ``sweep`` while this process holds lowrank's folder,
    as a second sweep into the same folder would: (the sweep's process, the lock's record at its end,
    read before this process lets go, which removes the file)."""
    lock = sweep / f"lowrank-b{budget}-s0" / ".lock"
    with locked(lock, what="the other sweep's job"):
        done = command("-m", "weight=lowrank,monarch", "dry_run=true", f"budget={budget}", f"cache_dir={cache_dir}",
                       f"hydra.sweep.dir={sweep}")
        return done, lock.read_text()


def test_a_sweep_skips_a_job_another_process_holds_and_reports_its_own_jobs(tmp_path, cache_dir):
    sweep, elsewhere = tmp_path / "sweep", "1 job(s) running elsewhere (another process holds the folder; skipped, " \
                                           "nothing written there): lowrank-b0.3-s0"
    done, record = held_sweep(sweep, cache_dir)
    assert done.returncode == 0, done.stderr[-2000:]  # a job running elsewhere is not a failure
    report = [ln.split(": ", 1)[1] for ln in done.stderr.splitlines() if ln.startswith(f"sweep in {sweep}: ")]
    assert report == [elsewhere, "1 job(s) finished in this process: monarch-b0.3-s0"]
    held = sweep / "lowrank-b0.3-s0"
    assert {p.name for p in held.iterdir()} <= {".hydra", "run.log"}  # no error.txt, no results.json, no lock left
    assert record.startswith(f"pid {os.getpid()} ")  # the holder's record untouched while it held the folder
    assert json.loads((sweep / "monarch-b0.3-s0" / "results.json").read_text())["completed"]

    failing, _ = held_sweep(tmp_path / "failing", cache_dir, "0.0001")  # monarch really fails
    assert failing.returncode == 6, failing.stderr[-2000:]
    assert "error: 1 job(s) of the sweep" in failing.stderr and "  monarch-b0.0001-s0: " in failing.stderr
    assert "1 job(s) running elsewhere" in failing.stderr
    assert not (tmp_path / "failing" / "lowrank-b0.0001-s0" / "error.txt").exists()

    again = command("-m", "weight=lowrank,monarch", "dry_run=true", f"cache_dir={cache_dir}",
                    f"hydra.sweep.dir={sweep}")
    assert again.returncode == 0, again.stderr[-2000:]  # free again: lowrank runs, monarch's dry run is redone
    assert "2 job(s) finished in this process: lowrank-b0.3-s0, monarch-b0.3-s0" in again.stderr
    assert json.loads((held / "results.json").read_text())["completed"]


def test_only_the_projects_own_bad_input_is_exit_2():
    from gblr.run.exits import BAD_INPUT, BUSY, exit_code
    from gblr.system.errors import BadInput, MissingInput

    assert exit_code(BadInput("x")) == exit_code(MissingInput("x")) == exit_code(BadFile("x")) == BAD_INPUT
    assert exit_code(Busy("x")) == BUSY
    assert exit_code(ValueError("a bug")) is None and exit_code(FileNotFoundError("a bug")) is None  # exit 1


def test_an_unexpected_value_error_in_a_run_shows_its_traceback_and_exits_1(tmp_path):
    code = ("import runpy, sys\nimport gblr.run.runner as runner\n"
            "def bug(*args, **kwargs):\n    raise ValueError('an internal bug')\n"
            f"runner.experiment = bug\nsys.argv = ['run.py', 'out_dir={tmp_path / 'out'}']\n"
            "runpy.run_path('run.py', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback (most recent call last)" in done.stderr and "in bug" in done.stderr
    assert "ValueError: an internal bug" in done.stderr and "error: an internal bug" not in done.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("key", ["out_dir", "hydra.run.dir"])
def test_one_run_folder_whichever_key_names_it(tmp_path, cache_dir, key):
    """results, checkpoint, export, .hydra/ and run.log together in the folder named, nothing elsewhere;
    gblr.evaluate on it gives the metrics results.json records."""
    import gblr

    folder = tmp_path / "here"
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), f"{key}={folder}", f"cache_dir={cache_dir}", *QUICK],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ["here"]
    names = {p.name for p in folder.iterdir()}
    assert {"results.json", "checkpoint.pt", "model.safetensors", "model.json", ".hydra", "run.log"} <= names
    result = json.loads((folder / "results.json").read_text())
    assert result["config"]["out_dir"] == str(folder) and "results.json" in (folder / "run.log").read_text()
    again = gblr.evaluate(folder)
    assert again[result["metric"]] == pytest.approx(result["metrics"][result["metric"]], abs=1e-9)
