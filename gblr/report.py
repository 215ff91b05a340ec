"""Results files: atomic JSON writes, the versions a result was made with, the summary table."""
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place, so a crash
    never leaves a half-written file and a reader sees the old or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def summary_table(result: dict) -> str:
    """A small plain-text table: dense start vs result, metric and relative FLOPs (MACs)."""
    metrics, flops = result["metrics"], result["flops"]
    if result.get("metric", "ppl" if "ppl" in metrics else "top1") == "ppl":
        name, start, end, fmt = "val perplexity", metrics.get("start_ppl"), metrics.get("ppl"), "{:.2f}"
    else:
        name, start, end, fmt = "val top-1 (%)", metrics.get("start_top1"), metrics.get("top1"), "{:.2f}"

    def show(value, f=fmt):
        return "-" if value is None else f.format(value)

    paper = flops.get("paper")
    rows = [("", "dense start", f"{result['weight']} @ budget {result['budget']:g}"),
            (name, show(start), show(end)),
            ("relative MACs, replaced layers", "1.000", show(flops["replaced"], "{:.4f}")),
            ("relative MACs, whole model", "1.000", show(flops["model"], "{:.4f}")),
            ("relative MACs, paper convention", "-" if paper is None else "1.000", show(paper, "{:.4f}")),
            ("MACs per example", f"{flops['dense_macs']:,}", f"{flops['macs']:,}")]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{result['model']} on {result['data']} (seed {result['seed']})"]
    for k, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("-" * (sum(widths) + 4))
    return "\n".join(lines)
