"""Progress that shows wherever a run's output goes.

On a terminal, tqdm bars (``disable=None`` is tqdm's "only when stderr is a terminal"). Off a
terminal — a log file, CI, ``nohup`` — bars would be carriage-return noise, so instead every open
piece of work (a :func:`~cnt_lens.core.timing.stage` or a :func:`progress_bar`) is tracked here and a
daemon thread logs the innermost one at INFO (``done/total`` and elapsed time) whenever nothing has
been logged for :data:`HEARTBEAT_S` seconds: a long step with no update of its own (one batch of
generation, one fine-tune step) still shows a line. Nothing is printed unless the ``cnt_lens`` logger
is set to INFO, as the CLI does.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm

__all__ = ["HEARTBEAT_S", "Task", "duration", "note", "progress_bar", "task"]

HEARTBEAT_S = 30.0
"""Longest quiet spell (seconds) off a terminal while work is open; a module attribute, so tests can shorten it."""

log = logging.getLogger("cnt_lens.core.progress")


@dataclass
class Task:
    """One piece of open work: its name, ``done`` of ``total`` steps (``total`` None: unknown) and its start."""

    desc: str
    total: int | None = None
    done: int = 0
    started: float = field(default_factory=time.monotonic)

    def status(self) -> str:
        """``"desc (done/total)"``, ``"desc (done done)"`` or ``"desc"``, with no count to give."""
        count = f"{self.done}/{self.total}" if self.total is not None else (f"{self.done} done" if self.done else "")
        return f"{self.desc} ({count})" if count else self.desc


def duration(seconds: float) -> str:
    """``"42 s"`` or ``"3 min 05 s"``.

    >>> duration(42.4), duration(185)
    ('42 s', '3 min 05 s')
    """
    s = int(round(seconds))
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60:02d} s"


_open: list[Task] = []
_lock = threading.Lock()
_quiet_since = [time.monotonic()]
_thread: list[threading.Thread] = []


def note(message: str, *args: Any, level: int = logging.INFO) -> None:
    """Log ``message`` on the progress logger and restart the quiet-spell clock."""
    _quiet_since[0] = time.monotonic()
    log.log(level, message, *args)


def _beat() -> None:
    """The heartbeat thread: log the innermost open task after :data:`HEARTBEAT_S` quiet seconds."""
    while True:
        time.sleep(min(0.5, HEARTBEAT_S / 4))  # a cheap check; it picks up a changed HEARTBEAT_S within 0.5 s
        with _lock:
            if not _open or time.monotonic() - _quiet_since[0] < HEARTBEAT_S or _on_terminal():
                continue
            note("… %s; %s elapsed", " / ".join(t.status() for t in _open),
                 duration(time.monotonic() - _open[0].started))


def _on_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class _Open:
    """Context manager of :func:`task`: registers the task, starts the heartbeat, unregisters on exit."""

    def __init__(self, t: Task) -> None:
        self.task = t

    def __enter__(self) -> Task:
        with _lock:
            _open.append(self.task)
            if not _thread:
                _thread.append(threading.Thread(target=_beat, name="cnt_lens-heartbeat", daemon=True))
                _thread[0].start()
        return self.task

    def __exit__(self, *exc: Any) -> None:
        with _lock:
            if self.task in _open:
                _open.remove(self.task)


def task(desc: str, total: int | None = None) -> _Open:
    """Open work the heartbeat reports on; count its steps with ``t.done += 1`` inside ``with ... as t``."""
    return _Open(Task(desc, total))


class _TrackedBar:
    """A tqdm bar whose steps are also counted in a :class:`Task` (iteration, ``update`` and ``close``)."""

    def __init__(self, bar: Any, opened: _Open) -> None:
        self._bar, self._opened = bar, opened
        opened.__enter__()

    def __iter__(self) -> Iterator[Any]:
        try:
            for x in self._bar:
                yield x
                self._opened.task.done += 1
        finally:
            self.close()

    def update(self, n: int = 1) -> Any:
        """Count ``n`` steps done (and move the bar)."""
        self._opened.task.done += n
        return self._bar.update(n)

    def close(self) -> None:
        """Close the bar and the task."""
        self._opened.__exit__()
        self._bar.close()

    def __enter__(self) -> "_TrackedBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str, total: int | None = None, enabled: bool = True,
                 min_total: int = 1, **kwargs: Any) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one with ``total``), quiet where it would be noise.

    The bar is off when ``enabled`` is false, when fewer than ``min_total`` steps are known, or when
    stderr is not a terminal; in the last case its steps feed the heartbeat (module docstring).
    """
    n = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)  # type: ignore[arg-type]
    off = not enabled or (n is not None and n < min_total)
    bar = tqdm(iterable, total=total, desc=desc, disable=True if off else None, **kwargs)
    return bar if off else _TrackedBar(bar, task(desc, n))
