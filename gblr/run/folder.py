"""A run folder and what it may hold: the run's identity, one writer, reuse only of its own results.

A run's identity is its resolved config without the keys that do not change its results
(``NOT_IDENTITY``: where files go, logging, devices, loader workers, resume itself). results.json and
every checkpoint store it. A run reuses a folder's results (a sweep's rerun skips a finished job) or
resumes its checkpoint only when the stored identity equals its own; otherwise it stops with one
line naming the keys that differ. ``fresh=true`` moves the other run's files into
``replaced-<time>/`` in the folder and starts over. One process at a time holds a folder (a lock
file, ``.lock``, removed when the run lets go: ``gblr.system.files.locked`` says why that is safe); a
second one is refused, naming the holder.
"""
import contextlib
import json
import logging
import time
from pathlib import Path

from omegaconf import OmegaConf

from gblr.system.files import BadFile, load_safely, locked, remove_temp_files
from gblr.system.errors import BadInput

log = logging.getLogger("gblr")

NOT_IDENTITY = ("logger", "resume", "fresh", "device", "out_dir", "cache_dir", "train.num_workers",
                "start.num_workers", "train.eval_batch_size", "train.stop_after", "train.log_every")
# What a run leaves in its folder (besides .hydra/ and run.log, which Hydra writes for each launch).
RUN_FILES = ("results.json", "checkpoint.pt", "model.safetensors", "model.json")


def identity(config) -> dict:
    """The resolved config as {dotted key: value}, without NOT_IDENTITY."""
    if config is None:
        return {}
    if not isinstance(config, dict):
        config = OmegaConf.to_container(config, resolve=True)
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = node

    walk(config, "")
    return {k: v for k, v in flat.items() if not any(k == n or k.startswith(n + ".") for n in NOT_IDENTITY)}


def differences(stored: dict, current: dict, limit: int = 4) -> str:
    """'key: stored -> current' for the keys that differ, at most ``limit`` of them, or ''."""
    keys = sorted(k for k in stored.keys() | current.keys() if stored.get(k, "<unset>") != current.get(k, "<unset>"))
    shown = [f"{k}: {stored.get(k, '<unset>')!r} -> {current.get(k, '<unset>')!r}" for k in keys[:limit]]
    return "; ".join(shown) + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


@contextlib.contextmanager
def claimed(run_dir: Path, main: bool = True):
    """Hold the folder's lock for the ``with`` block (main process only): a second run into it is refused
    (``gblr.system.files.Busy``), temp files of a killed writer are removed, and a stale error.txt goes."""
    if not main:
        yield
        return
    with locked(run_dir / ".lock", what=f"run folder {run_dir}"):
        remove_temp_files(run_dir)
        (run_dir / "error.txt").unlink(missing_ok=True)
        yield


def check_folder(cfg, run_dir: Path, skip_existing: bool) -> dict | None:
    """What the folder holds against this run (call it while holding the folder, see ``claimed``).

    Returns the stored result to reuse (``skip_existing``, finished, same identity), else None to run.
    Raises BadInput when the folder holds another run's files (or files that cannot be read) and
    fresh=true is not set; with fresh=true those files are moved aside.
    """
    me = identity(cfg)
    problems, previous = [], None
    results, checkpoint = run_dir / "results.json", run_dir / "checkpoint.pt"
    if results.exists():
        try:
            previous = json.loads(results.read_text())
            stored = previous.get("identity") or identity(previous.get("config"))
            # a dry run's report is replaced by any later run, never reused
            if not previous.get("dry_run") and (diff := differences(stored, me)):
                problems.append(f"{results.name} is of a run with other settings ({diff})")
        except (OSError, ValueError) as error:
            problems.append(f"{results.name} cannot be read ({error})")
    if checkpoint.exists():
        try:
            stored = load_safely(checkpoint, what="checkpoint", mmap=True).get("identity")
            if stored is None:
                problems.append(f"{checkpoint.name} was written without the run's identity (an older gblr)")
            elif diff := differences(stored, me):
                problems.append(f"{checkpoint.name} is of a run with other settings ({diff})")
        except BadFile as error:
            problems.append(str(error).replace(str(checkpoint), checkpoint.name))
    if problems:
        if not cfg.get("fresh"):
            raise BadInput(f"run folder {run_dir} holds another run: {'; '.join(problems)}. Choose another "
                           f"out_dir, or set fresh=true to move those files aside and start over")
        aside = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir(exist_ok=True)
        for name in RUN_FILES:
            if (run_dir / name).exists():
                (run_dir / name).rename(aside / name)
        log.warning(f"fresh=true: the previous run's files in {run_dir} were moved to {aside}")
        return None
    if cfg.resume and not checkpoint.exists():
        log.warning(f"resume=true, but {run_dir} has no checkpoint.pt: starting from the beginning")
    if skip_existing and not cfg.dry_run and previous and previous.get("completed") and not previous.get("dry_run"):
        log.info(f"skipping: {results} exists and was made with these settings")
        return previous
    return None


def resolve_run_dir(cfg) -> Path:
    """The run's one folder: under Hydra, its output folder (``hydra.run.dir``, which is ``out_dir``
    unless set itself; in a multirun, the job's ``hydra.sweep.subdir``), so that .hydra/, run.log,
    results.json, checkpoints and the export sit together whichever key the user set; else
    ``out_dir`` (tests call run() directly). ``cfg.out_dir`` is set to it, so results.json records it."""
    from omegaconf import open_dict

    folder = Path(cfg.out_dir).expanduser()
    try:
        from hydra.core.hydra_config import HydraConfig

        folder = Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under Hydra
        pass
    with open_dict(cfg):
        cfg.out_dir = str(folder)
    return folder
