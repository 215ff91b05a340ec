"""gblr entry point: `python run.py [group=option ...] [key=value ...]` (see configs/config.yaml).

In a multirun (`-m`) every job is isolated: a job that fails writes `error.txt` in its folder and
the sweep goes on; a rerun of the same sweep skips the jobs whose results.json already exists.
"""
import os
import sys
import traceback

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from gblr import distributed
from gblr.config import CONFIG_DIR
from gblr.runner import run


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg):
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        result = run(cfg, skip_existing=multirun)
        distributed.teardown()
        return result
    except (ValueError, FileNotFoundError) as error:  # bad input: one line, non-zero exit, nothing written
        if os.environ.get("GBLR_DEBUG"):
            raise
        if multirun:
            return job_failed(error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as error:  # a diverged run: say where; the last good checkpoint stays
        if multirun:
            return job_failed(error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(3)
    except Exception as error:
        if not multirun:
            raise
        return job_failed(error)


def job_failed(error: Exception) -> None:
    """Keep a failed job's reason in its folder and let the sweep go on."""
    path = os.path.join(HydraConfig.get().runtime.output_dir, "error.txt")
    with open(path, "w") as f:
        f.write("".join(traceback.format_exception(error)))
    print(f"error: job {HydraConfig.get().job.num} failed ({type(error).__name__}: {error}); see {path}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
