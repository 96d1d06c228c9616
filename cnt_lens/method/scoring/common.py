"""What every scorer shares: position masks, the donor→target direction, and the per-batch runs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from cnt_lens.behaviours.base import Behaviour
from cnt_lens.core.errors import CntLensError
from cnt_lens.data.tokens import Batch
from cnt_lens.method.selection import hook_name
from cnt_lens.models.forward import Model, device_of, logits_of
from cnt_lens.models.neurons import DonorWeights
from cnt_lens.models.pair import ModelPair

Positions = Union[Literal["all"], int]
"""Which token positions a scorer patches / sums over: every real token (``"all"``, the default,
which is what a weight transplant changes) or the last ``k`` tokens of each prompt."""

Hook = tuple[str, Callable[[Tensor, Any], Any]]


class BehaviourSignalError(CntLensError, ValueError):
    """The behaviour metric cannot rank neurons for this pair (NaN, or no donor–target difference)."""


def position_mask(batch: Batch, positions: Positions) -> Bool[Tensor, "batch pos"]:
    """Real tokens to patch / sum over; left padding means the last ``k`` columns are the last ``k`` tokens."""
    mask = batch.attention_mask.bool()
    if positions == "all":
        return mask
    if not isinstance(positions, int) or positions < 1:
        raise ValueError(f"positions must be 'all' or a positive int, got {positions!r}")
    last = torch.zeros_like(mask)
    last[:, -positions:] = True
    return mask & last


def forward(model: Model | DonorWeights, batch: Batch, behaviour: Behaviour, hooks: list[Hook] = ()) -> Float[Tensor, "batch kept vocab"]:
    """The logits ``behaviour.metric`` reads of ``model`` on ``batch``, with TransformerLens ``(tensor, hook)`` hooks.

    Only the last :meth:`~cnt_lens.Behaviour.logits_to_keep` positions are unembedded
    (:func:`~cnt_lens.models.logits_of`).
    """
    return logits_of(model, batch.tokens, batch.model_kwargs(), hooks, keep=behaviour.logits_to_keep(batch))


@dataclass
class Direction:
    """Mean behaviour metric of donor and target on the scored prompts, and the sign toward the donor.

    ``toward`` (the behaviour's own, +1 or −1) fixes the sign when the metric cannot be read fairly on
    the donor; otherwise the sign is that of ``donor − target``.
    """

    donor: float
    target: float
    toward: float | None = None

    @property
    def sign(self) -> float:
        """+1.0 or −1.0: the direction transplants should move the metric."""
        if self.toward is not None:
            return 1.0 if self.toward > 0 else -1.0
        return 1.0 if self.donor >= self.target else -1.0

    def check(self, behaviour: str) -> None:
        """Raise :class:`BehaviourSignalError` when donor and target do not differ on ``behaviour``.

        A NaN donor metric means the donor was not run (a streamed donor): ``toward`` must say the direction.
        """
        if math.isnan(self.donor) and math.isfinite(self.target):
            if self.toward is None:
                raise BehaviourSignalError(
                    f"the donor was not run (streamed: weights only), so the {behaviour} metric cannot say which "
                    f"way it moves; give the behaviour toward=+1.0 (the donor has more of it) or -1.0 (less)")
            return
        if not (math.isfinite(self.donor) and math.isfinite(self.target)):
            raise BehaviourSignalError(f"{behaviour} metric is not finite (donor {self.donor}, target {self.target})")
        if abs(self.donor - self.target) <= 1e-6 * max(1.0, abs(self.donor), abs(self.target)):
            raise BehaviourSignalError(
                f"{behaviour} metric is identical on donor and target ({self.donor:.6g}); "
                "there is no behavioural difference for a transplant to move"
            )


def measure_direction(pair: ModelPair, behaviour: Behaviour, batches: list[Batch]) -> Direction:
    """One no-grad forward of each model over ``batches``: where does the donor sit relative to the target?"""
    sums = []
    for model in (pair.donor, pair.target):
        total, n = 0.0, 0
        for b in batches:
            b = b.to(device_of(model))
            with torch.no_grad():
                m = behaviour.metric(forward(model, b, behaviour), b).float()
            total, n = total + float(m.sum()), n + m.numel()
        sums.append(total / max(n, 1))
    d = Direction(*sums, behaviour.toward)
    d.check(behaviour.name)
    return d


def capture(layers: list[int], which: str, store: dict[int, Tensor], detach: bool = True) -> list[Hook]:
    """Hooks that save ``blocks.{l}.mlp.{which}`` of each layer into ``store[l]``."""

    def make(layer: int) -> Callable[[Tensor, Any], None]:
        def hook(x: Tensor, hook: Any) -> None:
            store[layer] = x.detach() if detach else x

        return hook

    return [(hook_name(layer, which), make(layer)) for layer in layers]


def require_batches(batches: list[Batch], what: str) -> None:
    """Raise :class:`ValueError` naming ``what`` when ``batches`` is empty."""
    if not batches:
        raise ValueError(f"no prompts to score: the {what} split is empty")
