"""Writing files so that nothing is ever half-written: a reader sees the old file or the new one, never a mix.

Every file cnt_lens writes (patches, run metrics, cached fine-tunes, reports, exported checkpoints)
goes through :func:`atomic_write` or :func:`atomic_dir`: the content lands in a temporary name
beside the destination and is renamed over it in one step (``os.replace``), so a crash or a kill
leaves either the previous file or the complete new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["append_jsonl", "atomic_dir", "atomic_write", "atomic_write_text", "cache_dir", "sha256_file"]


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
