"""gblr entry point: `python run.py [group=option ...] [key=value ...]` (see configs/config.yaml)."""
import os
import sys

import hydra

from gblr.runner import run


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg):
    try:
        return run(cfg)
    except (ValueError, FileNotFoundError) as error:  # bad input: one line, non-zero exit, nothing written
        if os.environ.get("GBLR_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
