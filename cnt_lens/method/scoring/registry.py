"""The registry of scoring methods: each method is a *family* function with only its own options.

A family takes a :class:`Context` (what every method shares: the pair, the behaviour, the split's
batches, positions, progress) and its own keyword options, and returns :class:`Scored`. A method is
a family with some options fixed (``weight_attribution`` = the attribution family with
``kind="weight"``); registering a new one is one :func:`register_scorer` call.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from jaxtyping import Float
from torch import Tensor

from cnt_lens.behaviours.base import Behaviour
from cnt_lens.data.tokens import Batch
from cnt_lens.method.scoring.common import Direction, Positions
from cnt_lens.models.pair import ModelPair

__all__ = ["SCORERS", "Context", "Scored", "ScoringMethod", "register_scorer"]


@dataclass(frozen=True)
class Context:
    """What every scoring family shares. ``batches()`` encodes a behaviour's prompts of ``split``."""

    pair: ModelPair
    behaviour: Behaviour
    tokenizer: Any
    split: str | None
    batch_size: int
    positions: Positions
    progress: bool

    def batches(self, behaviour: Behaviour | None = None) -> list[Batch]:
        """Batches of ``behaviour`` (default: the scored one) on this context's split."""
        return (behaviour or self.behaviour).batches(self.tokenizer, self.split, self.batch_size)

    def control_batches(self, behaviour: Behaviour | None = None) -> list[Batch]:
        """Control batches of ``behaviour`` (default: the scored one) on this context's split."""
        return (behaviour or self.behaviour).control_batches(self.tokenizer, self.split, self.batch_size)


@dataclass(frozen=True)
class Scored:
    """A family's result.

    ``values`` (higher = moves the target toward the donor more), the number of scored items,
    method-specific ``meta``, and the measured donor/target ``direction`` when one was read.
    """

    values: Float[Tensor, "n_layers d_mlp"]
    n: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    direction: Direction | None = None


@dataclass(frozen=True)
class ScoringMethod:
    """A registered method: its family, the family options it fixes, and the options a caller may pass."""

    name: str
    family: Callable[..., Scored]
    fixed: dict[str, Any]
    options: tuple[str, ...]
    summary: str


SCORERS: dict[str, ScoringMethod] = {}


def register_scorer(name: str, family: Callable[..., Scored], summary: str, **fixed: Any) -> ScoringMethod:
    """Register ``family`` (with ``fixed`` options) as method ``name``; its other keyword options are the method's."""
    if name in SCORERS:
        raise ValueError(f"scoring method {name!r} is already registered")
    params = inspect.signature(family).parameters
    unknown = set(fixed) - set(params)
    if unknown:
        raise TypeError(f"{family.__name__} has no option(s) {sorted(unknown)}")
    options = tuple(p for p, v in params.items() if v.kind is v.KEYWORD_ONLY and p not in fixed)
    SCORERS[name] = ScoringMethod(name, family, dict(fixed), options, summary)
    return SCORERS[name]
