"""The records a transfer passes between its stages: a model's numbers, the donor's and target's, a search point.

``Block`` stays a plain dict: its keys are the numbers each behaviour defines (``refusal_harmful``,
``refusal_harmful_n``, ``refusal_harmful_ci95``, …), named by the behaviour, not by this module.
:class:`Reference` and :class:`Point` are frozen dataclasses that read like the JSON rows they are
written as (``point["k"]`` and ``point.k`` are the same), so tables, plots and constraints take either.

Example:
    >>> ref = Reference(donor={"refusal": 0.9}, target={"refusal": 0.1})
    >>> p = Point("random", k=4, fraction=0.5, alpha=2.0, gap_closed=0.5, goal_reached=False, acceptable=True,
    ...           measured="evaluation", numbers={"refusal": 0.5})
    >>> ref["donor"]["refusal"], p["k"], p.reached, dict(p)["refusal"]
    (0.9, 4, False, 0.5)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Protocol, runtime_checkable

__all__ = ["Block", "KLSource", "Point", "Reference"]

Block = dict[str, Any]  # one model's evaluation numbers on one split: floats, and each rate's ``_n`` and ``_ci95``


@runtime_checkable
class KLSource(Protocol):
    """What reads a model's first-token KL from an unedited one (:class:`~cnt_lens.method.divergence.KLReference`)."""

    def of(self, model: Any) -> Block:
        """``{kl_first_token, _n, _ci95}`` of ``model``."""
        ...


@dataclass(frozen=True, eq=False)
class Reference(Mapping[str, Block]):
    """The donor's and the target's numbers on one split, measured one way (``"evaluation"`` or ``"estimate"``).

    A search point is compared with the reference measured the same way: a point measured against an
    estimated reference is itself estimated. ``estimate`` carries the cheap estimates beside a full
    evaluation, when a screened search has measured them (so the next search reuses them). ``kl``: the
    unedited target's next-token log-probabilities on the split's KL inputs (a
    :class:`~cnt_lens.method.divergence.KLReference`), so that every point measured
    against this reference also reads its first-token KL (not serialised; ``None``: no KL).
    """

    donor: Block
    target: Block
    split: str = "validation"
    measured: str = "evaluation"
    estimate: "Reference | None" = None
    kl: KLSource | None = None

    def __getitem__(self, role: str) -> Block:
        if role not in ("donor", "target"):
            raise KeyError(role)
        return self.donor if role == "donor" else self.target

    def __iter__(self) -> Iterator[str]:
        return iter(("donor", "target"))

    def __len__(self) -> int:
        return 2

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self) == dict(other)

    def to_dict(self) -> dict[str, Block]:
        """``{"donor": …, "target": …}`` (what ``metrics.json`` records)."""
        return {"donor": self.donor, "target": self.target}

    @classmethod
    def from_dict(cls, data: Mapping[str, Block], **how: Any) -> "Reference":
        """A reference from its dict (``how``: ``split``, ``measured``)."""
        return cls(donor=dict(data["donor"]), target=dict(data["target"]), **how)


@dataclass(frozen=True, eq=False)
class Point(Mapping[str, Any]):
    """One measured search point: ``method``'s top ``k`` neurons transplanted at ``alpha``, on validation.

    ``fraction`` is k over all MLP neurons; ``gap_closed`` the share of the donor–target gap closed
    on the behaviour's headline; ``acceptable`` whether the run's constraint held; ``measured``
    ``"estimate"`` or ``"evaluation"``; ``numbers`` the patched target's block. Read as a mapping it is
    the flat row ``frontier.json`` holds (these fields, ``reached``, then every number).
    """

    method: str
    k: int
    fraction: float
    alpha: float
    gap_closed: float
    goal_reached: bool
    acceptable: bool
    measured: str
    numbers: Block

    @property
    def reached(self) -> bool:
        """Goal reached and acceptable."""
        return self.goal_reached and self.acceptable

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON row."""
        return {"method": self.method, "k": self.k, "fraction": self.fraction, "alpha": self.alpha,
                "gap_closed": self.gap_closed, "goal_reached": self.goal_reached, "acceptable": self.acceptable,
                "reached": self.reached, "measured": self.measured, **self.numbers}

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and self.to_dict() == dict(other)
