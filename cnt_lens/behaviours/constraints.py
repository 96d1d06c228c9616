"""What a transplant must not break: constraints on a validation point, given the donor's and target's numbers.

A constraint is ``constraint(point, reference) -> bool``: ``point`` is a block of numbers measured on
the patched target (:func:`~cnt_lens.method.evaluate.measure`), ``reference`` holds the same numbers for
``reference["donor"]`` and ``reference["target"]``. :func:`~cnt_lens.workflow.pipeline.transfer` keeps only
acceptable points when it chooses a neuron set and an alpha, for the main method and every baseline.
"""

from __future__ import annotations

from typing import Callable, Mapping

from cnt_lens.core.records import Block

__all__ = ["Constraint", "for_behaviour", "no_more_over_refusal", "task_kept", "utility_kept"]

Constraint = Callable[[Block, Mapping[str, Block]], bool]

UTILITY_SLACK = 1.01  # the patched model's utility NLL may be at most 1% above the target's


def utility_kept(point: Block, ref: Mapping[str, Block]) -> bool:
    """Utility NLL (nats per token) at most 1% above the target's."""
    return point["utility_nll"] <= UTILITY_SLACK * ref["target"]["utility_nll"]


def no_more_over_refusal(point: Block, ref: Mapping[str, Block]) -> bool:
    """Refusal of harmless prompts no higher than the donor's, and :func:`utility_kept` (function addition)."""
    return point["refusal_harmless"] <= ref["donor"]["refusal_harmless"] + 1e-9 and utility_kept(point, ref)


def task_kept(point: Block, ref: Mapping[str, Block]) -> bool:
    """NLSR realignment's constraint: the fine-tuned task survives and utility is kept.

    The benign task the target learnt (``task_rate``; target = fine-tuned, donor = before) keeps ≥95% of
    its gain over the donor, and :func:`utility_kept` holds.
    """
    gain = ref["target"]["task_rate"] - ref["donor"]["task_rate"]
    return point["task_rate"] - ref["donor"]["task_rate"] >= 0.95 * gain and utility_kept(point, ref)


def for_behaviour(headline: str) -> Constraint:
    """The default constraint of a transfer of ``headline``.

    For refusal, :func:`no_more_over_refusal` when the donor refuses more than the target (addition) and
    :func:`utility_kept` when less (deletion); for anything else, :func:`utility_kept`.
    """
    if headline != "refusal_harmful":
        return utility_kept

    def refusal(point: Block, ref: Mapping[str, Block]) -> bool:
        adding = ref["donor"]["refusal_harmful"] > ref["target"]["refusal_harmful"]
        return no_more_over_refusal(point, ref) if adding else utility_kept(point, ref)

    refusal.__name__ = "refusal_default"
    return refusal
