"""Progress bars that show on a terminal and stay silent in logs (tqdm, which already handles both).

``disable=None`` is tqdm's own "only when stderr is a terminal": CI logs and files redirected from a
run get no carriage-return updates, while a notebook or an interactive shell shows the bar.
"""

from __future__ import annotations

from typing import Any, Iterable

from tqdm.auto import tqdm

__all__ = ["progress_bar"]


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str, total: int | None = None, enabled: bool = True,
                 min_total: int = 1, **kwargs: Any) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one with ``total``), quiet where it would be noise.

    Off when ``enabled`` is false, when fewer than ``min_total`` steps are known, or when stderr is
    not a terminal.
    """
    n = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)  # type: ignore[arg-type]
    off = not enabled or (n is not None and n < min_total)
    return tqdm(iterable, total=total, desc=desc, disable=True if off else None, **kwargs)
