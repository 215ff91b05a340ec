"""gblr entry point: `python run.py [group=option ...] [key=value ...]` (see configs/config.yaml).

In a multirun (`-m`) every job is isolated: a job that fails writes `error.txt` in its folder and
the sweep goes on; a rerun of the same sweep skips the jobs whose results.json already exists.
"""
import os
import sys
import traceback

if __name__ == "__main__":  # our help page, before anything heavy is imported (torch takes seconds)
    from gblr.cli_help import page, wants_help

    if wants_help(sys.argv[1:]):
        print(page())
        sys.exit(0)

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from gblr.config import CONFIG_DIR

# Exit codes by kind of failure: 2 = bad input (nothing written), 3 = a diverged run (the last
# good checkpoint stays). Anything else is a bug: its traceback is shown.
EXIT_CODES = {ValueError: 2, FileNotFoundError: 2, FloatingPointError: 3}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg):
    # Imported here, not at the top: Hydra's --cfg, --info and shell completion never need torch.
    from gblr import distributed
    from gblr.runner import run

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        result = run(cfg, skip_existing=multirun)
        distributed.teardown()
        return result
    except Exception as error:
        if multirun:  # keep the reason in the job's folder and let the sweep go on
            path = os.path.join(HydraConfig.get().runtime.output_dir, "error.txt")
            with open(path, "w") as f:
                f.write("".join(traceback.format_exception(error)))
            print(f"error: job {HydraConfig.get().job.num} failed ({type(error).__name__}: {error}); see {path}",
                  file=sys.stderr)
            return None
        code = next((c for kind, c in EXIT_CODES.items() if isinstance(error, kind)), None)
        if code is None or os.environ.get("GBLR_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
