"""Exit codes of `python run.py`, and the report of a sweep's failed jobs.

    0  finished: results.json describes this run (a multirun: no job failed; jobs whose folder another
       process holds are skipped as "running elsewhere")
    1  a bug: the traceback is shown (please report it)
    2  bad input: one `error:` line names the key, the value and what is allowed; nothing trained. Hydra's
       own errors too: an unknown group option, an override that does not parse, a folder it cannot create
    3  non-finite loss: the last good checkpoint stays
    4  busy: another process holds the run folder
    5  stopped (SIGTERM / SIGUSR1 in any phase, or train.stop_after): one line says where, and whether
       resume=true continues or the command is run again; no results.json
    6  a multirun in which at least one job failed (each failed job has error.txt; a summary is printed)

This module imports neither torch nor gblr's model code, so `run.py --help` stays fast.
"""
import errno
import sys
import time
from pathlib import Path

from hydra.core.utils import JobStatus
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf.errors import OmegaConfBaseException

FINISHED, BUG, BAD_INPUT, DIVERGED, BUSY, STOPPED, SWEEP_FAILED = 0, 1, 2, 3, 4, 5, 6

# Exception class name -> exit code, the most specific first: gblr.system.files.Busy, the project's own
# bad-input errors (gblr.system.errors.BadInput and its subclasses, BadFile among them) and a non-finite
# loss. Any other exception, a ValueError raised by a bug included, is exit 1 with its traceback.
# Names, not classes, so that this table needs no import of torch.
BY_EXCEPTION = (("Busy", BUSY), ("BadInput", BAD_INPUT), ("FloatingPointError", DIVERGED))


def exit_code(error: BaseException) -> int | None:
    """The code for ``error`` by the table above, or None (a bug)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return next((code for name, code in BY_EXCEPTION if name in names), None)


def command_error(error: BaseException) -> str | None:
    """The one line (without 'error: ') for an error Hydra raised before or around a run (composing the
    config, parsing an override, creating the run folder), or None for any other: those are bugs.
    run.py sets HYDRA_FULL_ERROR, so that these reach it instead of Hydra's own printout."""
    if isinstance(error, MissingConfigException) and error.options and "/" in (error.missing_cfg_file or ""):
        group, option = error.missing_cfg_file.rsplit("/", 1)
        return f"{group}={option}: no such option of {group}; options: {', '.join(error.options)}"
    if isinstance(error, OverrideParseException):
        return f"cannot parse the override {error.override!r} ({one_line(error)}); see python run.py --help"
    if isinstance(error, HydraException):
        cause = f" ({one_line(error.__cause__)})" if isinstance(error.__cause__, OmegaConfBaseException) else ""
        return one_line(error) + cause
    if isinstance(error, OmegaConfBaseException):
        return one_line(error)
    if isinstance(error, OSError) and error.filename:
        return folder_error(error)
    return None


def one_line(error: BaseException) -> str:
    """A multi-line message of Hydra or OmegaConf as one line, without Hydra's search-path listing and links."""
    text = str(error).split("Config search path:")[0]
    lines = [ln.strip().rstrip(".") for ln in text.splitlines()]
    return "; ".join(ln for ln in lines if ln and not ln.startswith("See https://"))


def folder_error(error: OSError) -> str:
    """A folder Hydra could not create or write (the run folder, a sweep's)."""
    path = str(error.filename)
    if error.errno == errno.ENAMETOOLONG:
        longest = max(map(len, Path(path).parts))
        shown = path if len(path) <= 80 else f"{path[:50]}...{path[-20:]}"
        return (f"the run folder {shown} ({len(path)} characters, a name of {longest}) is too long for the file "
                f"system (names up to 255 bytes, paths up to 4096): choose a shorter out_dir or hydra.sweep.dir")
    return f"cannot create or write {path} ({error.strerror}): choose a folder you can write to (out_dir)"


class SweepReport(Callback):
    """A Hydra callback (configs/config.yaml: hydra.callbacks): after a multirun, says which jobs finished in
    this process, which were already finished, which were skipped because another process holds their
    folder ("running elsewhere": a second sweep into the same folder) and which failed; run.py exits 6 when
    one failed. run.py's ``main`` returns each job's outcome, which ``on_job_end`` reads in the process
    that ran the job; a launcher that runs jobs in other processes (submitit) leaves none here, and the
    failed jobs are then the error.txt files written since the sweep began."""

    failed: list[Path] = []
    jobs: dict[str, list[str]] = {}  # outcome -> job folder names, in this process

    def __init__(self):
        self.started = time.time()

    def on_multirun_start(self, config, **kwargs) -> None:
        self.started = time.time()
        SweepReport.failed, SweepReport.jobs = [], {}

    def on_job_end(self, config, job_return, **kwargs) -> None:
        value = job_return.return_value if job_return.status == JobStatus.COMPLETED else {"failed": None}
        outcome = job_outcome(value if isinstance(value, dict) else {})
        SweepReport.jobs.setdefault(outcome, []).append(Path(config.hydra.runtime.output_dir).name)

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if SweepReport.jobs:
            errors = [sweep_dir / name / "error.txt" for name in SweepReport.jobs.get("failed", [])]
        else:  # jobs ran in other processes
            errors = sorted(p for p in sweep_dir.rglob("error.txt") if p.stat().st_mtime >= self.started - 1)
        SweepReport.failed = [p.parent for p in errors]
        lines = [f"sweep in {sweep_dir}: {len(names)} job(s) {OUTCOMES[outcome]}: {', '.join(names)}"
                 for outcome, names in SweepReport.jobs.items() if outcome != "failed"]
        if errors:
            lines.append(f"error: {len(errors)} job(s) of the sweep in {sweep_dir} failed:")
            for path in errors:
                text = path.read_text() if path.exists() else ""
                last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "")
                lines.append(f"  {path.parent.name}: {last[:200]}")
        print("\n".join(lines), file=sys.stderr, flush=True)


OUTCOMES = {"finished": "finished in this process", "reused": "were already finished (their results.json kept)",
            "elsewhere": "running elsewhere (another process holds the folder; skipped, nothing written there)",
            "failed": "failed"}


def job_outcome(result: dict) -> str:
    """A key of OUTCOMES for what run.py's ``main`` returned for a job."""
    if result.get("completed"):
        return "reused" if result.get("reused") else "finished"
    return "elsewhere" if "elsewhere" in result else "failed"
