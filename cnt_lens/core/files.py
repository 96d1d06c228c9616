"""Writing files so that nothing is ever half-written: a reader sees the old file or the new one, never a mix.

Every file cnt_lens writes (patches, run metrics, cached fine-tunes, reports, exported checkpoints)
goes through :func:`atomic_write` or :func:`atomic_dir`: the content lands in a temporary name
beside the destination and is renamed over it in one step (``os.replace``), so a crash or a kill
leaves either the previous file or the complete new one.

Temporary names carry the writing process's id (``.NAME.PID.XXXX.tmp``): the next write beside the same
destination removes those whose process is gone, so a killed write leaves nothing behind for long. A
directory replaced by :func:`atomic_dir` is first moved aside to ``.NAME.old``; a crash between that and
the second rename is repaired by the next call (the old directory is put back, with a warning).
:func:`directory_lock` keeps two processes from writing one run directory at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from cnt_lens.core.errors import CntLensError

__all__ = ["DirectoryLockedError", "append_jsonl", "atomic_dir", "atomic_write", "atomic_write_text", "cache_dir",
           "directory_lock", "sha256_file"]

log = logging.getLogger(__name__)


class DirectoryLockedError(CntLensError, RuntimeError):
    """Another process is writing the same directory (the message names it and the process)."""


def cache_dir() -> Path:
    """cnt_lens's cache (tuned weights, assembled offline models): ``$CNT_LENS_CACHE``, default ``~/.cache/cnt_lens``."""
    return Path(os.environ.get("CNT_LENS_CACHE", Path.home() / ".cache" / "cnt_lens"))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (large model files never sit in memory whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def clean_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries of writes to ``path`` whose process has ended (killed mid-write); return them.

    Only names this module makes (``.NAME.PID.XXXX.tmp``) are touched, and only when no process ``PID`` runs.
    """
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            removed.append(tmp)
    if removed:
        log.info("removed %d temporaries of killed writes to %s", len(removed), path)
    return removed


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def append_jsonl(path: str | Path, row: Any) -> str:
    """Append ``row`` to ``path`` as one JSON line and sync it; returns the line.

    For logs that grow one result at a time (the one kind of file not replaced whole): a kill leaves
    every earlier line intact and at most the last one cut short, which readers skip. Values JSON
    cannot hold natively (tensors, numpy scalars) go through ``float``.
    """
    line = json.dumps(row, default=float)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    return line


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` (only if ``overwrite``).

    On any error the temporary directory is removed and ``path`` is left as it was.
    """
    path = Path(path)
    old = _aside(path)
    recover_swap(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _aside(path: Path) -> Path:
    """Where :func:`atomic_dir` moves the directory it replaces, for the moment between its two renames."""
    return path.with_name(f".{path.name}.old")


def recover_swap(path: str | Path) -> bool:
    """Finish what a crash between :func:`atomic_dir`'s two renames left: put ``.NAME.old`` back if ``path`` is gone.

    Returns whether it put one back (logged as a warning). With both there, the new one had landed and
    the stale ``.NAME.old`` is removed.
    """
    path = Path(path)
    old = _aside(path)
    if not old.exists():
        return False
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        return False
    os.replace(old, path)
    log.warning("%s was missing after an interrupted replacement; its previous version was put back from %s",
                path, old.name)
    return True


@contextlib.contextmanager
def directory_lock(directory: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (its ``.lock`` file) for the block; yield the directory.

    A second process asking for it fails at once with :class:`DirectoryLockedError` naming the holder; the
    operating system releases the lock when the holder ends, killed or not, so a stale ``.lock`` file never blocks.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise DirectoryLockedError(f"{directory} is being written by another cnt-lens process (pid {holder}); "
                                       "wait for it to finish, or write to another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield directory
    finally:
        os.close(fd)  # closing the descriptor releases the lock
