"""gblr entry point: `python run.py [group=option ...] [key=value ...]` (see configs/config.yaml).

Exit codes (gblr/run/exits.py): 0 finished, 1 a bug (traceback), 2 bad input (Hydra's own errors too: an
unknown option, an override that does not parse, a folder it cannot create), 3 non-finite loss, 4 the run
folder is in use, 5 stopped (SIGTERM / SIGUSR1 in any phase; one line says whether resume=true continues),
6 a multirun with failed jobs. In a multirun (`-m`) a job that fails writes `error.txt` in its folder
and the sweep goes on; a job whose folder another process holds is skipped as running elsewhere (nothing
is written there, not a failure); at the end the jobs are listed by outcome and the exit code is 6 when
one failed. A stop signal stops the whole sweep (exit 5). A rerun of a sweep skips the jobs whose
results.json holds a finished run of the same settings.
"""
import os
import sys
import traceback
from pathlib import Path

if __name__ == "__main__":  # our help page, before anything heavy is imported (torch takes seconds)
    from gblr.run.help import page, wants_help

    if wants_help(sys.argv[1:]):
        try:
            print(page())
        except BrokenPipeError:  # `run.py --help | head`
            pass
        sys.exit(0)

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from gblr.run import exits
from gblr.system.config import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg):
    # Imported here, not at the top: Hydra's --cfg, --info and shell completion never need torch.
    from gblr.system import distributed
    from gblr.run.runner import run

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        result = run(cfg, skip_existing=multirun)
        distributed.teardown()
    except Exception as error:
        if multirun:
            return job_not_done(error)
        code = exits.exit_code(error)
        if code is None or os.environ.get("GBLR_DEBUG"):
            traceback.print_exc()  # a bug; here, since everything that leaves main is Hydra's (see below)
            sys.exit(exits.BUG)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(code)
    if not result.get("completed"):
        print(result["stopped"], file=sys.stderr)
        sys.exit(exits.STOPPED)  # in a multirun, this stops the whole sweep
    return result


def job_not_done(error: Exception) -> dict:
    """A multirun's job that did not finish, as its outcome for exits.SweepReport. A folder that another
    process holds (a second sweep into the same folder) is left alone: the job is running elsewhere.
    Otherwise the reason goes to the job's error.txt and the sweep goes on."""
    job = HydraConfig.get()
    folder = Path(job.runtime.output_dir)
    if exits.exit_code(error) == exits.BUSY:
        print(f"skipped: job {job.job.num} ({folder.name}) is running elsewhere: {error}", file=sys.stderr)
        return {"completed": False, "elsewhere": str(error)}
    path = folder / "error.txt"
    path.write_text("".join(traceback.format_exception(error)))
    print(f"error: job {job.job.num} failed ({type(error).__name__}: {error}); see {path}", file=sys.stderr)
    return {"completed": False, "failed": str(path)}


if __name__ == "__main__":
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's own errors reach the handler below, not Hydra's printout
    try:
        main()
    except Exception as error:  # raised by Hydra: main() handles every error of the run itself
        line = exits.command_error(error)
        if line is None or os.environ.get("GBLR_DEBUG"):
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(exits.BAD_INPUT)
    if exits.SweepReport.failed:
        sys.exit(exits.SWEEP_FAILED)
