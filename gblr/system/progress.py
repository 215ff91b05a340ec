"""Progress of long loops: a tqdm bar on a terminal, a log line now and then in a log file.

A Slurm job's stderr is a file, where a bar would be one line per redraw or nothing; there the
loops log instead. Only rank 0 shows progress (the other ranks' logger is quiet, see the runner).
"""
import logging
import sys
import time

from tqdm.auto import tqdm

from gblr.system import distributed

log = logging.getLogger("gblr")


def interactive() -> bool:
    """Whether to draw bars: stderr is a terminal, and this is rank 0."""
    return sys.stderr.isatty() and distributed.is_main()


def progress(iterable, desc: str, total: int | None = None, every_s: float = 30.0):
    """Yield the items of ``iterable``: under a bar on a terminal, else logging "desc: i/total
    (elapsed)" whenever ``every_s`` seconds have passed since the last line (none for a quick loop)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if interactive():
        yield from tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
        return
    start = last = time.monotonic()
    for i, item in enumerate(iterable, start=1):
        yield item
        now = time.monotonic()
        if now - last >= every_s:
            log.info(f"{desc}: {i}/{total if total is not None else '?'} ({now - start:.0f} s)")
            last = now
