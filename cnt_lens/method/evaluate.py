"""Before/after evaluation: one block of numbers per model, side by side with the baselines.

A block is a flat dict of the behaviour's and utility's evaluation numbers on one split (e.g.
``refusal_harmful``, ``refusal_harmless``, ``utility_nll``, ``mc_accuracy``); every rate comes with
its ``_n`` and Wilson ``_ci95`` (:mod:`cnt_lens.core.stats`); the patched and
baseline blocks add ``method``, ``n_neurons`` and ``alpha``. :class:`Report` serialises to the
``metrics.json`` schema documented in the README.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cnt_lens.behaviours.base import Behaviour
from cnt_lens.core.files import atomic_write_text
from cnt_lens.core.records import Block
from cnt_lens.core.stats import format_rate, is_companion, wilson_interval
from cnt_lens.core.timing import stage
from cnt_lens.data.prompt_set import CROSS_ROLES
from cnt_lens.method.divergence import KL_NAME
from cnt_lens.method.resume import recall_records
from cnt_lens.models.forward import Model

__all__ = ["Report", "gap_shares", "measure", "wilson_interval"]


def measure(model: Model, behaviours: Sequence[Behaviour], split: str | None, *, batch_size: int = 16,
            progress: bool = False, items: list[dict[str, Any]] | None = None, estimate: bool = False) -> Block:
    """All evaluation numbers of ``behaviours`` for ``model`` on ``split``, merged into one block.

    ``split`` has no default: say ``"validation"`` while choosing anything, ``"test"`` only to report.

    With ``items`` (a list), the per-prompt records the numbers were computed from (responses,
    refusal flags, pair gaps, …) are appended to it, each with its ``behaviour``; without, each
    behaviour may generate only as far as its verdicts need (:meth:`~cnt_lens.Behaviour.decided_items`:
    the same numbers). With ``estimate``,
    the numbers are each behaviour's cheap estimate (:meth:`~cnt_lens.Behaviour.estimate_items`: same keys;
    for refusal a short greedy opening, judged), for deciding between candidates, not for reporting.
    Inside :func:`~cnt_lens.method.resume.resumable` each behaviour's records are remembered and reused; a
    behaviour whose estimate is its evaluation (:attr:`~cnt_lens.Behaviour.estimate_is_evaluation`, e.g.
    :class:`~cnt_lens.Utility`) is remembered as evaluated, so a point estimated first and evaluated later
    measures it once.
    """
    out: Block = {}
    for b in behaviours:
        cheap = estimate and not b.estimate_is_evaluation
        with stage(f"{'estimate' if estimate else 'evaluate'} {b.name}"):
            run = b.estimate_items if cheap else b.evaluate_items if items is not None else b.decided_items
            recs = recall_records(model, b, split, estimate=cheap, batch_size=batch_size,
                                  texts=cheap or items is not None or b.decided_is_evaluation,
                                  compute=lambda: run(model, split, batch_size=batch_size, progress=progress))
        out.update(b.aggregate(recs))
        if items is not None:
            items += [{"behaviour": b.name, **r} for r in recs]
    return out


def _first_rate(block: dict[str, Any]) -> str | None:
    """The first number of a block that carries an interval (its headline, as the behaviours order them)."""
    return next((k for k, v in block.items() if isinstance(v, float) and f"{k}_ci95" in block), None)


@dataclass
class Report:
    """Numbers of one transfer: donor, target, patched target and the baselines at the same budget."""

    behaviour: str
    split: str
    n_neurons_total: int
    donor: Block
    target: Block
    patched: dict[str, Any]
    baselines: list[dict[str, Any]] = field(default_factory=list)
    frontier: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def headline(self) -> str | None:
        """The transferred behaviour's headline number: the first rate of the target's block (behaviours list it first)."""
        return _first_rate(self.target)

    def __repr__(self) -> str:
        rates = ", ".join(f"{m} {b[key]:.3g}" for m, b in (("target", self.target), ("patched", self.patched),
                                                            ("donor", self.donor)) for key in [_first_rate(b)] if key)
        return (f"Report({self.behaviour!r} on {self.split}: {self.patched.get('n_neurons', '?')} neurons at alpha "
                f"{self.patched.get('alpha', '?')}; {rates}; baselines {[b.get('method') for b in self.baselines]})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the report (what :meth:`save` writes)."""
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON, atomically; return the path."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1, default=float))

    @classmethod
    def load(cls, path: str | Path) -> "Report":
        """Read a report written by :meth:`save`."""
        return cls(**json.loads(Path(path).read_text()))

    def rows(self) -> list[dict[str, Any]]:
        """Table rows: target, donor, patched, then each baseline."""
        return ([{"model": "target", **self.target}, {"model": "donor", **self.donor},
                 {"model": f"patched ({self.patched.get('method')})", **self.patched}]
                + [{"model": f"baseline {b.get('method')}", **b} for b in self.baselines])

    def table(self, columns: Sequence[str] | None = None) -> str:
        """A markdown table of :meth:`rows`."""
        rows = self.rows()
        cols = self.columns(columns)
        lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += ["| " + r["model"] + " | " + " | ".join(format_rate(r, c) for c in cols) + " |" for r in rows]
        return "\n".join(lines)

    def units_table(self) -> str:
        """The field's units, one row per model: refusals per 100 harmful prompts and first-token KL from the target.

        The headline rate times 100 (interval and n), and ``kl_first_token`` (the unedited target's
        next-token distribution against each model's on the behaviour's harmless inputs); ``""`` when
        the run has neither a refusal headline nor a KL.
        """
        headline = self.headline()
        per_100 = headline if headline and headline.startswith("refusal") else None
        if per_100 is None and KL_NAME not in self.target:
            return ""
        cols = ([f"{per_100} per 100"] if per_100 else []) + ([f"{KL_NAME} (nats)"] if KL_NAME in self.target else [])
        lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for r in self.rows():
            cells = []
            if per_100:
                ci, n = r.get(f"{per_100}_ci95") or [float("nan")] * 2, r.get(f"{per_100}_n")
                cells.append(f"{100 * r[per_100]:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}] n={n}"
                             if isinstance(r.get(per_100), float) else "")
            if KL_NAME in self.target:
                cells.append(format_rate(r, KL_NAME, digits=4))
            lines.append("| " + r["model"] + " | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def shares(self, number: str = "refusal_harmful") -> list[dict[str, Any]]:
        """:func:`gap_shares` of ``number`` for the patched model and each baseline (``share_<method>``)."""
        rows = gap_shares(self.target, self.donor, self.patched, number)
        for b in self.baselines:
            for row, other in zip(rows, gap_shares(self.target, self.donor, b, number)):
                row[f"share_{b.get('method')}"] = other["share"]
        return rows

    def shares_cells(self, number: str = "refusal_harmful") -> tuple[list[str], list[list[str]], list[str]]:
        """:meth:`shares` as text: column names, one row of cells per group, and the held-out ratios.

        The ratios divide the held-out share of the gap by each in-distribution one
        (``"held_out ÷ selection: 0.91"``, …). No rows when ``number`` is not split into groups (a run whose prompts all come from one family).
        """
        rows = self.shares(number)
        if len(rows) < 2:
            return [], [], []
        extra = [k for k in rows[0] if k.startswith("share_")]
        cols = ["group", "n", "target", "donor", "patched", "share", *extra]
        cells = [[r["group"], str(r["n"]), f"{r['target']:.3f}", f"{r['donor']:.3f}", format_rate(r["block"], r["key"]),
                  *(f"{r[c]:.2f}" for c in ("share", *extra))] for r in rows]
        shares = {r["group"]: r["share"] for r in rows}
        ratios = [f"held_out ÷ {inside}: {shares['held_out'] / shares[inside]:.2f}" for inside in ("selection", "search")
                  if "held_out" in shares and shares.get(inside)]
        return cols, cells, ratios

    def shares_table(self, number: str = "refusal_harmful") -> str:
        """:meth:`shares_cells` as a markdown table, then the ratios; empty when there are no groups."""
        cols, cells, ratios = self.shares_cells(number)
        if not cells:
            return ""
        lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|", *("| " + " | ".join(c) + " |" for c in cells)]
        if ratios:
            lines.append("\nShare of the donor–target gap out of distribution ÷ in distribution — " + "; ".join(ratios))
        return "\n".join(lines)

    def numbers(self) -> list[str]:
        """The names of the target block's numbers (floats), without the rates' ``_n``/``_ci95`` companions."""
        return [c for c, v in self.target.items() if isinstance(v, float) and not is_companion(c)]

    def columns(self, columns: Sequence[str] | None = None) -> list[str]:
        """``columns`` (default: :meth:`numbers`), then ``n_neurons`` and ``alpha``.

        A rate's cell shows its interval and n (:func:`~cnt_lens.core.stats.format_rate`).
        """
        cols = list(columns or self.numbers())
        return cols + [c for c in ("n_neurons", "alpha") if c not in cols]


def gap_shares(target: Block, donor: Block, patched: Block, number: str = "refusal_harmful") -> list[dict[str, Any]]:
    """``number`` and each of its groups: the three models' rates and the patched share of the gap.

    Groups are the ``{number}_{group}`` rates a behaviour reports when its prompts mix roles or
    families (:func:`~cnt_lens.data.cross_distribution`): ``all`` first, then the roles in
    :data:`~cnt_lens.data.CROSS_ROLES` order (neurons' family, k and alpha's family, held out), then the
    families. ``share`` = (patched − target) / (donor − target), NaN where donor and target agree.
    Each row holds ``group``, ``n``, ``target``, ``donor``, ``patched``, ``share``, and ``block`` /
    ``key`` (the patched block and its key, for :func:`~cnt_lens.core.stats.format_rate`).

    Example:
        >>> from cnt_lens.core.stats import rate
        >>> t = {**rate("r", [0, 0, 0, 0]), **rate("r_held_out", [0, 0])}
        >>> d = {**rate("r", [1, 1, 1, 1]), **rate("r_held_out", [1, 1])}
        >>> p = {**rate("r", [1, 1, 1, 0]), **rate("r_held_out", [1, 0])}
        >>> [(r["group"], r["share"]) for r in gap_shares(t, d, p, "r")]
        [('all', 0.75), ('held_out', 0.5)]
    """
    order = {g: i for i, g in enumerate(CROSS_ROLES)}
    groups = sorted((k for k, v in target.items()
                     if k.startswith(number + "_") and isinstance(v, float) and not is_companion(k)),
                    key=lambda k: (order.get(k[len(number) + 1:], len(order)), k))
    rows = []
    for key in [number, *groups]:
        if key not in target or key not in patched or key not in donor:
            continue
        t, d, p = target[key], donor[key], patched[key]
        rows.append({"group": "all" if key == number else key[len(number) + 1:], "n": target.get(f"{key}_n"),
                     "target": t, "donor": d, "patched": p,
                     "share": (p - t) / (d - t) if abs(d - t) > 1e-12 else float("nan"), "block": patched, "key": key})
    return rows
