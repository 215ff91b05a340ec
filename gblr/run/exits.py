"""Exit codes of `python run.py`, and the report of a sweep's failed jobs.

    0  finished: results.json describes this run
    1  a bug: the traceback is shown (please report it)
    2  bad input: one `error:` line names the key, the value and what is allowed; nothing trained
    3  non-finite loss: the last good checkpoint stays
    4  busy: another process holds the run folder
    5  stopped (SIGTERM / SIGUSR1 or train.stop_after): resumable with resume=true
    6  a multirun in which at least one job failed (each failed job has error.txt; a summary is printed)

This module imports neither torch nor gblr's model code, so `run.py --help` stays fast.
"""
import logging
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback

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


class SweepReport(Callback):
    """A Hydra callback (configs/config.yaml: hydra.callbacks): after a multirun, lists the jobs that
    failed in it (an error.txt written since the sweep began) and makes run.py exit 6."""

    failed: list[Path] = []

    def __init__(self):
        self.started = time.time()

    def on_multirun_start(self, config, **kwargs) -> None:
        self.started = time.time()
        SweepReport.failed = []

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        errors = sorted(p for p in sweep_dir.rglob("error.txt") if p.stat().st_mtime >= self.started - 1)
        SweepReport.failed = [p.parent for p in errors]
        if errors:
            lines = [f"error: {len(errors)} job(s) of the sweep in {sweep_dir} failed:"]
            for path in errors:
                first = next((ln for ln in reversed(path.read_text().splitlines()) if ln.strip()), "")
                lines.append(f"  {path.parent.name}: {first[:200]}")
            print("\n".join(lines), file=sys.stderr, flush=True)
        else:
            logging.getLogger("gblr").info(f"every job of the sweep in {sweep_dir} finished")
