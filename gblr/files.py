"""Results files: atomic writes (files and folders), the versions a result was made with, the summary table."""
import json
import os
import platform
import secrets
import shutil
import subprocess
from pathlib import Path

import torch


def atomic_write(path: str | Path, write, directory: bool = False) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place, so a crash
    never leaves a half-written file or folder and a reader sees the old or the new one.

    ``write`` gets ``tmp`` as a str and creates the file there; with ``directory=True`` it gets an
    empty folder to fill. A folder cannot be renamed over another non-empty one: when a concurrent
    writer put ``path`` in place first, its copy is kept and this one is dropped.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name, not tempfile.mkstemp/mkdtemp: their 0600/0700 modes would survive the rename
    # and hide shared caches and results from other users.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        if directory:
            tmp.mkdir()
        write(str(tmp))
        os.replace(tmp, path)
    except OSError:
        if not (directory and path.is_dir()):
            raise
    finally:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_json(path: str | Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def save_checkpoint(path: str | Path, obj) -> None:
    """torch.save, atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def versions() -> dict:
    """Library versions and the code's git commit, recorded next to every result."""
    import timm
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "transformers": transformers.__version__, "gblr_commit": commit}
