"""The behaviour layer: what a model does on a prompt set, as a differentiable metric and an evaluation.

:mod:`~cnt_lens.behaviours.base` (the :class:`Behaviour` interface), :mod:`~cnt_lens.behaviours.refusal`,
:mod:`~cnt_lens.behaviours.bias`, :mod:`~cnt_lens.behaviours.utility` (the side effects),
:mod:`~cnt_lens.behaviours.generation` (greedy, verified generation), :mod:`~cnt_lens.behaviours.judge`
(refusal verdicts) and :mod:`~cnt_lens.behaviours.constraints` (what a validation point must keep).
The behaviours and generation are re-exported here.
"""

from __future__ import annotations

from cnt_lens.behaviours.base import Behaviour, pair_logprob_gap, sequence_logprobs
from cnt_lens.behaviours.bias import StereotypeBias
from cnt_lens.behaviours.generation import GenerationError, canary, generate, verify_greedy
from cnt_lens.behaviours.refusal import OpeningTree, Refusal, donor_refusal
from cnt_lens.behaviours.utility import FormatTask, Utility

__all__ = ["Behaviour", "FormatTask", "GenerationError", "OpeningTree", "Refusal", "StereotypeBias", "Utility", "canary", "donor_refusal", "generate", "pair_logprob_gap", "sequence_logprobs", "verify_greedy"]
