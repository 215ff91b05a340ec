"""wandb as its users expect: a grouped run whose id lives in the run folder, resumed by resume=true.

The real wandb library runs offline (no network) into the temporary run folder; the test reads
back what it wrote: the records of its offline ``.wandb`` files (a LevelDB-style log of protobuf
records, parsed with wandb's own message classes).
"""
import json
import struct
import time
from pathlib import Path

import pytest
from hydra import compose as compose_hydra, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from gblr.system.config import CONFIG_DIR, compose
from gblr.run.tracking import ID_FILE, Logger, run_id, sweep_name

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402


def records(path: Path):
    """The protobuf Records of a wandb transaction log: a 7-byte header, then 32 KiB blocks of chunks
    (crc32 4 bytes, length 2, type 1: full, first, middle, last)."""
    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        if kind == 0:  # zero padding at a block's end
            pos += block - pos % block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def key(item) -> str:
    return item.key or "/".join(item.nested_key)  # "train/loss" may come as the path [train, loss]


def read_offline_run(path: Path) -> dict:
    """run id, group, the logged history rows (keys without wandb's own _...), summary, exit code."""
    out = {"history": [], "summary": {}}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"], out["group"], out["resumed"] = record.run.run_id, record.run.run_group, record.run.resumed
        elif kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in record.history.item
                                   if not key(i).startswith("_")})
        elif kind == "summary":
            out["summary"].update({key(i): i.value_json for i in record.summary.update})
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def read_finished_run(path: Path, timeout_s: float = 1800.0) -> dict:
    """``read_offline_run`` once the file holds the run's exit record (wandb's service may still be
    writing it when ``finish()`` returns); the bound is far above a loaded machine's worst case."""
    deadline = time.monotonic() + timeout_s
    while "exit_code" not in (out := read_offline_run(path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return out


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # the suite's default is disabled (conftest)
    monkeypatch.setenv("WANDB_SILENT", "true")


RESULT = {"metrics": {"top1": 41.5, "start_top1": 30.0},
          "flops": {"replaced": 0.29, "model": 0.45, "paper": None},
          "layers": [{"name": "blocks.0.mlp.fc1", "kind": "gblr", "shape": (256, 64), "relative": 0.3,
                      "components": {"active": 3}},
                     {"name": "blocks.0.mlp.fc2", "kind": "gblr", "shape": (64, 256), "relative": 0.28}]}


def test_a_resumed_run_continues_the_same_grouped_wandb_run(tmp_path, offline):
    run_dir = tmp_path / "gblr-b0.3-s0"
    first = Logger(compose("logger=wandb", "logger.group=budget-sweep"), run_dir)
    first.log({"train/loss": 2.5, "train/lr": 1e-3, "note": "text is left out"}, step=50)
    first.log({"val/top1": 30.0, "epoch": 1}, step=100)
    first.close({"metrics": {"top1": 30.0}}, preempted=True)
    stored = (run_dir / ID_FILE).read_text()

    second = Logger(compose("logger=wandb", "logger.group=budget-sweep", "resume=true"), run_dir)
    second.log({"train/loss": 1.5, "train/lr": 5e-4}, step=150)
    second.close(RESULT)
    assert (run_dir / ID_FILE).read_text() == stored

    logs = sorted((run_dir / "wandb").glob(f"offline-run-*-{stored}/run-{stored}.wandb"))
    assert len(logs) == 2  # both sessions wrote to the run with the stored id
    before, after = (read_finished_run(p) for p in logs)
    assert before["id"] == after["id"] == stored and before["group"] == after["group"] == "budget-sweep"
    assert [(h["step"], sorted(h)) for h in before["history"]] == [
        (50, ["step", "train/loss", "train/lr"]), (100, ["epoch", "step", "val/top1"])]
    assert after["history"][0] == {"step": 150, "train/loss": 1.5, "train/lr": 5e-4}
    summary = after["summary"]
    assert float(summary["top1"]) == 41.5 and float(summary["flops/replaced"]) == 0.29
    assert "flops/paper" not in summary  # None is not a number to plot
    assert int(summary["layers/nrows"]) == 2 and after["exit_code"] == 0


def test_a_fresh_run_in_the_same_folder_gets_a_new_id(tmp_path):
    first = run_id(tmp_path, resume=False)
    assert run_id(tmp_path, resume=True) == first == (tmp_path / ID_FILE).read_text()
    second = run_id(tmp_path, resume=False)
    assert second != first and (tmp_path / ID_FILE).read_text() == second
    assert run_id(tmp_path / "new", resume=True) != second  # resume=true without a stored id starts one


def test_the_group_defaults_to_the_sweep_folder_in_a_multirun(tmp_path):
    assert compose("logger=wandb").logger.group is None and sweep_name() is None  # a single run: no group
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose_hydra("config", overrides=[f"hydra.sweep.dir={tmp_path / 'mini_vision-digits'}"],
                            return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN  # as a multirun job sees it
    HydraConfig.instance().set_config(cfg)
    try:
        assert sweep_name() == "mini_vision-digits"
    finally:
        HydraConfig.instance().cfg = None


def test_wandb_mode_in_the_environment_overrides_logger_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # wandb.init alone would let logger.mode=offline win
    logger = Logger(compose("logger=wandb", "logger.mode=offline"), tmp_path)
    logger.log({"train/loss": 1.0}, step=1)
    logger.close(RESULT)
    assert not (tmp_path / "wandb").exists()
