"""Where a run's time goes: a per-stage wall-clock profile, written as ``timings.json`` by every run.

Stages nest (a generation inside the search is ``search / generate``); the same stage entered
many times accumulates its seconds and counts its calls. Instrumented code only says ``with
stage("name"):`` — a no-op unless a :func:`profile` is active in the same context, so library
calls from a notebook cost nothing and need no profiler object passed around (the pattern of
``torch.profiler.record_function``).

Example:
    >>> with profile() as prof:
    ...     with stage("score"):
    ...         with stage("forward"):
    ...             pass
    ...     with stage("score"):
    ...         pass
    >>> [(r["stage"], r["calls"]) for r in prof.rows()]
    [('score', 2), ('score / forward', 1)]
"""

from __future__ import annotations

import contextlib
import json
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from cnt_lens.core.files import atomic_write_text
from cnt_lens.core.progress import duration, note, task

__all__ = ["LONG_STAGE_S", "Profile", "active_profile", "profile", "stage", "timings_table"]

_ACTIVE: ContextVar["Profile | None"] = ContextVar("cnt_lens_profile", default=None)
_DEPTH: ContextVar[int] = ContextVar("cnt_lens_stage_depth", default=0)

LONG_STAGE_S = 20.0
"""A nested stage that takes at least this long (seconds) logs its end at INFO too (outermost stages always do)."""


@dataclass
class Profile:
    """Accumulated wall seconds and call counts per stage path, in first-entered order."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    _stack: list[str] = field(default_factory=list)

    def total(self) -> float:
        """Wall seconds since the profile started."""
        return time.perf_counter() - self.started

    def rows(self) -> list[dict[str, Any]]:
        """One dict per stage path: ``stage``, ``depth``, ``seconds``, ``calls``, ``share`` (of the total wall time)."""
        total = self.total() or 1.0
        return [{"stage": s, "depth": s.count(" / "), "seconds": round(t, 3), "calls": self.calls[s],
                 "share": round(t / total, 4)} for s, t in self.seconds.items()]

    def to_dict(self) -> dict[str, Any]:
        """``{"total_s": …, "stages": rows()}``: what :meth:`save` writes."""
        return {"total_s": round(self.total(), 3), "stages": self.rows()}

    def table(self) -> str:
        """The profile as aligned text (:func:`timings_table`)."""
        return timings_table(self.to_dict())

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as JSON (``timings.json`` of a run directory), atomically."""
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1))


def timings_table(timings: dict[str, Any] | str | Path) -> str:
    """A saved profile (its dict, or the path of its ``timings.json``) as aligned text, nested stages indented."""
    if not isinstance(timings, dict):
        timings = json.loads(Path(timings).read_text(encoding="utf-8"))
    lines = [f"{'stage':<46} {'seconds':>9} {'calls':>6} {'share':>6}"]
    for r in timings["stages"]:
        name = "  " * r["depth"] + r["stage"].rsplit(" / ", 1)[-1]
        lines.append(f"{name[:46]:<46} {r['seconds']:>9.1f} {r['calls']:>6} {r['share']:>6.1%}")
    lines.append(f"{'total (wall)':<46} {timings['total_s']:>9.1f}")
    return "\n".join(lines)


def active_profile() -> Profile | None:
    """The profile the current context records into, or ``None``."""
    return _ACTIVE.get()


@contextlib.contextmanager
def profile() -> Iterator[Profile]:
    """Record the stages entered inside the block; an already active profile is reused (nested runs add to it)."""
    outer = _ACTIVE.get()
    if outer is not None:
        yield outer
        return
    prof = Profile()
    token = _ACTIVE.set(prof)
    try:
        yield prof
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block as stage ``name`` (nested under the stages already open) in the active profile.

    Also progress (:mod:`cnt_lens.core.progress`): an outermost stage logs its start and end at INFO, a
    nested one its end when it took :data:`LONG_STAGE_S` or more, and the heartbeat names the open
    stages during long quiet work — with or without a profile.
    """
    depth = _DEPTH.get()
    token = _DEPTH.set(depth + 1)
    if depth == 0:
        note("%s …", name)
    t0 = time.perf_counter()
    outcome = "failed after"
    try:
        with task(name), _recorded(name):
            yield
        outcome = "done in"
    finally:
        _DEPTH.reset(token)
        seconds = time.perf_counter() - t0
        if depth == 0 or seconds >= LONG_STAGE_S:
            note("%s: %s %s", name, outcome, duration(seconds))


@contextlib.contextmanager
def _recorded(name: str) -> Iterator[None]:
    """Add the block's wall time to stage ``name`` of the active profile (nothing without one)."""
    prof = _ACTIVE.get()
    if prof is None:
        yield
        return
    prof._stack.append(name)
    path = " / ".join(prof._stack)
    prof.seconds.setdefault(path, 0.0)
    prof.calls[path] = prof.calls.get(path, 0) + 1
    t0 = time.perf_counter()
    try:
        yield
    finally:
        prof.seconds[path] += time.perf_counter() - t0
        prof._stack.pop()
