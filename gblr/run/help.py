"""``python run.py --help``: a page made from the configs' table of contents, without importing torch.

The page lists every config group of configs/config.yaml's defaults list with its options (the
files in configs/<group>/, each with the first line of its header comment), the default option,
the key settings with their defaults and comments, and examples. It reads the YAML files as text
(the comments are the documentation), so it needs only the standard library and runs in a few
tens of milliseconds; run.py prints it before importing Hydra, torch or the runner.
"""
import re
from pathlib import Path

from gblr.system.config import CONFIG_DIR

# The sections of config.yaml whose settings are listed ("" = the top level).
SETTINGS = ("", "train", "start")
WIDTH = 84  # characters of an option's description

EXAMPLES = """\
  python run.py                                              the default: tiny ViT on the embedded digits, GBLR at budget 0.3
  python run.py weight=lowrank budget=0.25                   another weight type and budget
  python run.py experiment=gpt2_tiny_pydoc                   the embedded language run (tiny GPT-2, offline)
  python run.py model=vit_base weight=gblr dry_run=true      FLOP report only: no data, no training
  python run.py experiment=vit_base_imagenet_ft weight=gblr data.root=/data/imagenet
  python run.py -m weight=lowrank,monarch,gblr budget=0.2,0.3 seed=0,1,2   a sweep (one job per point)
  python run.py -m sweep=mini_vision                         a preset grid (configs/sweep/)
  python -c "import gblr.run.export as e; m = e.load('outputs/vit_tiny-digits/gblr-b0.3-s0')"   the exported model"""


def _header(path: Path) -> str:
    """The first line of a config file's header comment ('' when it has none)."""
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text.startswith("#"):
            return ""
        text = text.lstrip("#").strip()
        if text and not text.startswith("@package"):
            return text if len(text) <= WIDTH else text[:WIDTH - 3].rstrip(" ,;:(") + "..."
    return ""


def _defaults(lines: list[str]) -> list[tuple[str, str, str]]:
    """(group, default option, comment) from the defaults list, in its order; package-placed
    entries (``structure@weight.options``) are internal and skipped."""
    groups, inside = [], False
    for line in lines:
        if line.startswith("defaults:"):
            inside = True
            continue
        if inside and not line.startswith((" ", "\t")) and line.strip():
            break
        match = re.match(r"\s*-\s*(?:optional\s+)?([\w/]+)\s*:\s*([^#\s]+)\s*(?:#\s*(.*))?$", line) if inside else None
        if match and "@" not in match.group(1):
            groups.append((match.group(1), match.group(2), (match.group(3) or "").strip()))
    return groups


def _settings(lines: list[str]) -> list[tuple[str, str, str]]:
    """(dotted key, default, comment) of the scalar settings in SETTINGS' sections of config.yaml."""
    found, section = [], ""
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        match = re.match(r"\s*([\w]+):\s*(.*?)\s*(?:#\s*(.*))?$", line)
        if not match:
            continue
        key, value, comment = match.group(1), match.group(2), (match.group(3) or "").strip()
        if indent == 0:
            section = "" if value else key
            if value and key != "defaults":
                found.append((key, value, comment))
        elif indent == 2 and section in SETTINGS and section and value and "${" not in value:
            found.append((f"{section}.{key}", value, comment))  # interpolated ones follow another key
    return found


def page(config_dir: Path = CONFIG_DIR) -> str:
    """The help page for the configs in ``config_dir``."""
    lines = (config_dir / "config.yaml").read_text().splitlines()
    out = ["gblr: fine-tune a model whose linear layers are structured matrices (dense, low-rank, Monarch,",
           "Gaudi-GBLR, BLAST) under a FLOP budget, and report accuracy or perplexity against relative MACs.",
           "",
           "Usage: python run.py [GROUP=OPTION ...] [KEY=VALUE ...]",
           "       python run.py -m [GROUP=A,B ...] [KEY=1,2 ...]      (a sweep: one job per combination)",
           "",
           "Config groups (configs/GROUP/OPTION.yaml; * = default):"]
    for group, default, comment in _defaults(lines):
        folder = config_dir / group
        options = sorted(folder.glob("*.yaml")) if folder.is_dir() else []
        out.append(f"  {group}" + (f"  ({comment})" if comment and not options else ""))
        width = max((len(p.stem) for p in options), default=0)
        for path in options:
            mark = "*" if path.stem == default else " "
            out.append(f"    {mark} {path.stem.ljust(width)}  {_header(path)}".rstrip())
        if default == "null":
            out.append("    * (none)")
    out += ["", "Key settings (configs/config.yaml; KEY=VALUE overrides, e.g. train.epochs=3):"]
    width = 30
    for key, value, comment in _settings(lines):
        setting = f"{key}={value}"
        if len(setting) > width and comment:  # a long default: its comment on the next line
            out += [f"  {setting}", f"  {'':{width}}  {comment}"]
        else:
            out.append(f"  {setting.ljust(width)}  {comment}".rstrip())
    out += ["", "Examples:", EXAMPLES, "",
            "More: README.md; the composed config: python run.py --cfg job; Hydra's own options: "
            "python run.py --hydra-help"]
    return "\n".join(out)


def wants_help(argv: list[str]) -> bool:
    """Whether the command line asks for this page (``--help`` / ``-h``, as Hydra spells them)."""
    return any(arg in ("--help", "-h") for arg in argv)
