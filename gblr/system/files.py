"""Files a run trusts: atomic writes, safe loading, locks, checksummed cache entries, versions.

- ``atomic_write``: a reader sees the old file or the new one, never half of one (temp + rename).
- ``load_safely``: ``torch.load(weights_only=True)``; tensors and plain containers only, so
  loading a planted file never runs code. A file it cannot load raises ``BadFile`` naming it.
- ``locked``: one writer per run folder or cache entry (``fcntl.flock``); a second process is
  told who holds it (``Busy``) or waits for it. The lock file is removed when it is released.
- cache entries: each file ``x`` has ``x.json`` beside it with the key it was made for and its
  sha256; ``entry_problem`` says why an entry may not be used (missing, of the wrong kind, other
  key, corrupt); ``clear_entry`` makes room for a new one without deleting what the cache did not make.
"""
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import torch

from gblr.system.errors import BadInput

log = logging.getLogger("gblr")
TEMP_MARK = ".tmp-"


class BadFile(BadInput):
    """A file that cannot be loaded safely: truncated, corrupt, or holding more than tensors."""


class Busy(RuntimeError):
    """A run folder or cache entry that another process holds."""


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
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        if directory:
            tmp.mkdir()
        write(str(tmp))
        if not directory:  # some writers (safetensors) create their file 0600 whatever the umask
            os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except OSError:
        if not (directory and path.is_dir()):
            raise
    finally:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def save_checkpoint(path: str | Path, obj) -> None:
    """torch.save, atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def remove_temp_files(folder: str | Path, name: str = "") -> list[Path]:
    """Delete the temp files ``atomic_write`` left in ``folder`` (for ``name``, or any) when a writer
    was killed mid-write. Call it only while holding the lock of what is written there."""
    found = list(Path(folder).glob(f".{name}*{TEMP_MARK}*"))
    for p in found:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return found


def load_safely(path: str | Path, map_location="cpu", what: str = "file", mmap: bool = False) -> dict:
    """``torch.load(path, weights_only=True)``, or ``BadFile`` naming the file and why."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # truncated zip, EOF, a pickled object that is not plain data, ...
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        if "weights only" in str(error).lower() or "weights_only" in str(error):
            reason = "it holds Python objects that only an unsafe load (one that can run code) would read"
        raise BadFile(f"{what} {path} cannot be loaded safely: {reason}") from None


@contextlib.contextmanager
def locked(path: str | Path, what: str, wait: bool = False):
    """Hold an exclusive lock on ``path`` (created; it records the holder) for the ``with`` block.

    wait=False: raise ``Busy`` naming the holder when another process has it (a run folder);
    wait=True: wait for it, saying so once (a cache entry another run is building).
    Raises BadInput when the lock cannot be created (the folder is not writable).
    The lock file is removed at the end, so a finished run leaves none behind.
    """
    path = Path(path)
    handle = take_lock(path, what, wait)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield
    finally:
        # Removing the file is safe against a second process: it is removed while still locked, so no
        # one takes the lock between the removal and the release; a process that opened it before
        # the removal and then gets its lock holds a removed file, which ``take_lock`` sees (the path
        # no longer names it) and so it tries again on the path's new file. Every taker checks that.
        with contextlib.suppress(OSError):
            if holds(handle, path):
                path.unlink()
        handle.close()  # releases the lock


def take_lock(path: Path, what: str, wait: bool):
    """An open handle of ``path`` holding its flock, once the path still names the file locked."""
    said = False
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")
        except OSError as error:
            raise BadInput(f"{what}: cannot write in {path.parent} ({error.strerror}); "
                           f"choose a writable folder") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            if not wait:
                handle.close()
                raise Busy(f"{what} is in use by {holder}; wait for it to finish or choose another folder") from None
            if not said:
                log.info(f"waiting for {holder}, which holds {what}")
                said = True
            fcntl.flock(handle, fcntl.LOCK_EX)
        if holds(handle, path):
            return handle
        handle.close()  # the holder removed the file we locked: take the path's new one


def holds(handle, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``handle``."""
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except OSError:
        return False


def check_writable(folder: str | Path, key: str) -> None:
    """BadInput naming ``key`` unless ``folder`` exists or can be made, and a file can be written in it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise BadInput(f"{key} {str(folder)!r} is not writable ({error.strerror}); choose a folder you can write "
                       f"to") from None


def checksum(path: str | Path) -> str:
    """sha256 of a file, or of a folder's relative file names and contents."""
    path, digest = Path(path), hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            digest.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def entry_record(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def write_entry(path: str | Path, write, key, directory: bool = False) -> None:
    """Write a cache entry atomically (``atomic_write``), then its record: the key and checksum."""
    atomic_write(path, write, directory=directory)
    write_json(entry_record(path), {"key": key, "sha256": checksum(path)})


def wrong_kind(path: Path, directory: bool) -> str | None:
    """What is wrong with the kind of thing at ``path`` for a cache entry (a file, or a folder with
    directory=True), or None: one of the other kind, or a symbolic link that leads nowhere."""
    if path.is_symlink() and not path.exists():
        return "is a symbolic link to nothing"
    if path.exists() and path.is_dir() != directory:
        return "is a folder where a file belongs" if path.is_dir() else "is a file where a folder belongs"
    return None


def entry_problem(path: str | Path, key, directory: bool = False) -> str | None:
    """Why the cache entry at ``path`` (a file, or a folder with directory=True) may not be used for
    ``key`` (None when it may)."""
    path, record = Path(path), entry_record(path)
    if kind := wrong_kind(path, directory):
        return kind
    if kind := wrong_kind(record, False):
        return f"has a record ({record.name}) that {kind}"
    if not path.exists():
        return "is missing"
    try:
        stored = json.loads(record.read_text())
    except (OSError, ValueError):
        return f"has no readable record ({record.name})"
    if stored.get("key") != json.loads(json.dumps(key, default=str)):
        return "was made for other settings"
    if stored.get("sha256") != checksum(path):
        return "is corrupt (its checksum does not match its record)"
    return None


def cached(path: str | Path, key, build, load, directory: bool = False):
    """``load(path)`` of the cache entry at ``path``, made by ``build(tmp)`` first when it is missing,
    of the wrong kind, made for another key, corrupt or unreadable (a warning names it then; what is
    not the cache's is moved aside, ``clear_entry``). One process builds an entry while the others
    wait for it."""
    path = Path(path)
    with locked(path.with_name(path.name + ".lock"), what=f"cache entry {path}", wait=True):
        remove_temp_files(path.parent, path.name)
        problem = entry_problem(path, key, directory)
        if problem is None:
            try:
                return load(path)
            except Exception as error:  # a library's own reader: it names the trouble, not the file
                problem = f"cannot be read ({str(error).splitlines()[0][:160] if str(error) else type(error).__name__})"
        if path.exists() or path.is_symlink():
            log.warning(f"warning: cache entry {path} {problem}; making it again")
        clear_entry(path, directory)
        write_entry(path, build, key, directory=directory)
        return load(path)


def clear_entry(path: str | Path, directory: bool = False) -> None:
    """Make room for a new cache entry at ``path`` and its record (call it holding the entry's lock).

    What the cache makes there (a file, or a folder with directory=True, not a link) is deleted;
    anything else (a folder where a file belongs or the reverse, a symbolic link, whose target is
    never touched) is not the cache's to delete: it is moved aside to ``<name>.bad-<time>``, with a
    warning naming both, so that the entry is made again and nothing of the user's is lost.
    """
    path = Path(path)
    for item, as_folder in ((path, directory), (entry_record(path), False)):
        if not (item.exists() or item.is_symlink()):
            continue
        if not item.is_symlink() and item.is_dir() == as_folder:
            if item != entry_record(path):  # a record of the right kind is simply rewritten
                shutil.rmtree(item) if as_folder else item.unlink()
            continue
        aside = item.with_name(f"{item.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")
        item.rename(aside)
        log.warning(f"warning: {item} {wrong_kind(item, as_folder) or 'is a symbolic link'}; moved it to {aside} "
                    f"(delete it when it is not needed) and making the cache entry again")


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
