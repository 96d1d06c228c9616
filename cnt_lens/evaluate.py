"""Before/after evaluation: one block of numbers per model, side by side with the baselines.

A block is a flat dict of the behaviour's and utility's evaluation numbers on one split (e.g.
``refusal_harmful``, ``refusal_harmless``, ``utility_nll``, ``mc_accuracy``); the patched and
baseline blocks add ``method``, ``n_neurons`` and ``alpha``. :class:`Report` serialises to the
``metrics.json`` schema documented in the README.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .behaviours import Behaviour
from .files import atomic_write_text

__all__ = ["Report", "measure", "wilson_interval"]


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (95% by default); ``(nan, nan)`` when ``n == 0``.

    Unlike the normal approximation it stays inside [0, 1] and is honest at 0/n and n/n, where small
    evaluation splits often sit.

    Example:
        >>> tuple(round(x, 3) for x in wilson_interval(0, 24))
        (0.0, 0.138)
    """
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def measure(model: Any, behaviours: Sequence[Behaviour], split: str | None, *, batch_size: int = 16,
            progress: bool = False, items: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """All evaluation numbers of ``behaviours`` for ``model`` on ``split``, merged into one block.

    ``split`` has no default: say ``"validation"`` while choosing anything, ``"test"`` only to report.

    With ``items`` (a list), the per-prompt records the numbers were computed from (responses,
    refusal flags, pair gaps, …) are appended to it, each with its ``behaviour``.
    """
    out: dict[str, float] = {}
    for b in behaviours:
        recs = b.evaluate_items(model, split, batch_size=batch_size, progress=progress)
        out.update(b.aggregate(recs))
        if items is not None:
            items += [{"behaviour": b.name, **r} for r in recs]
    return out


@dataclass
class Report:
    """Numbers of one transfer: donor, target, patched target and the baselines at the same budget."""

    behaviour: str
    split: str
    n_neurons_total: int
    donor: dict[str, float]
    target: dict[str, float]
    patched: dict[str, Any]
    baselines: list[dict[str, Any]] = field(default_factory=list)
    frontier: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1, default=float))

    @classmethod
    def load(cls, path: str | Path) -> "Report":
        return cls(**json.loads(Path(path).read_text()))

    def rows(self) -> list[dict[str, Any]]:
        """Table rows: target, donor, patched, then each baseline."""
        return ([{"model": "target", **self.target}, {"model": "donor", **self.donor},
                 {"model": f"patched ({self.patched.get('method')})", **self.patched}]
                + [{"model": f"baseline {b.get('method')}", **b} for b in self.baselines])

    def table(self, columns: Sequence[str] | None = None) -> str:
        """A markdown table of :meth:`rows`."""
        rows = self.rows()
        cols = list(columns or [c for c in rows[0] if c != "model"])
        extra = [c for c in ("n_neurons", "alpha") if c not in cols]
        cols = cols + extra
        fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
        lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += ["| " + r["model"] + " | " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
        return "\n".join(lines)
