"""gblr entry point: `python run.py [group=option ...] [key=value ...]` (see configs/config.yaml).

Exit codes (gblr/run/exits.py): 0 finished, 1 a bug (traceback), 2 bad input, 3 non-finite loss, 4 the run
folder is in use, 5 stopped and resumable (resume=true), 6 a multirun with failed jobs. In a multirun
(`-m`) a job that fails writes `error.txt` in its folder and the sweep goes on; at the end the failed
jobs are listed and the exit code is 6. A stop signal stops the whole sweep (exit 5). A rerun of a
sweep skips the jobs whose results.json holds a finished run of the same settings.
"""
import os
import sys
import traceback

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
        if multirun:  # keep the reason in the job's folder and let the sweep go on
            path = os.path.join(HydraConfig.get().runtime.output_dir, "error.txt")
            with open(path, "w") as f:
                f.write("".join(traceback.format_exception(error)))
            print(f"error: job {HydraConfig.get().job.num} failed ({type(error).__name__}: {error}); see {path}",
                  file=sys.stderr)
            return None
        code = exits.exit_code(error)
        if code is None or os.environ.get("GBLR_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(code)
    if not result.get("completed"):
        if result["resumable"]:  # fine-tuning wrote a checkpoint where it stopped
            print(f"stopped: resume=true continues {result['run_dir']}", file=sys.stderr)
        else:  # stopped in the dense start, which is cached only when finished
            print("stopped before fine-tuning began, nothing to resume: run the command again", file=sys.stderr)
        sys.exit(exits.STOPPED)  # in a multirun, this stops the whole sweep
    return result


if __name__ == "__main__":
    main()
    if exits.SweepReport.failed:
        sys.exit(exits.SWEEP_FAILED)
