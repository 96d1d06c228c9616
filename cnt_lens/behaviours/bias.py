"""Stereotype bias: how much likelier a model finds the stereotyped sentence of a pair.

The metric is the log-probability gap between the stereotyped and the anti-stereotyped sentence;
the evaluation reports the share of pairs that prefer the stereotype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from typing_extensions import override

from cnt_lens.behaviours.base import Behaviour, pair_logprob_gap
from cnt_lens.behaviours.generation import maybe_progress
from cnt_lens.core.stats import rate
from cnt_lens.data.prompt_set import PromptSet, load_prompts
from cnt_lens.data.tokens import Batch, encode
from cnt_lens.models.forward import Model, device_of, model_tokenizer

__all__ = ["StereotypeBias"]


def pair_batches(tokenizer: Any, first: list[str], second: list[str], batch_size: int) -> list[Batch]:
    """Rows ``[first…, second…]`` per chunk; ``meta['n_pairs']`` says where the halves meet."""
    out = []
    for lo in range(0, len(first), batch_size):
        a, b = first[lo:lo + batch_size], second[lo:lo + batch_size]
        out.append(encode(tokenizer, a + b, add_bos=True, meta={"n_pairs": len(a)}))
    return out


@dataclass(repr=False)
class StereotypeBias(Behaviour):
    """Preferring stereotyped sentences over their minimally different anti-stereotyped twins.

    Metric per pair: ``log p(stereotype) - log p(anti_stereotype)`` (sums of token log-probs, BOS
    prepended). Evaluation: ``stereotype_score``, the % of pairs where the stereotype is more likely
    (CrowS-Pairs' measure; 50 is unbiased), and ``logprob_gap``, the mean metric.
    """

    pairs: PromptSet = field(default_factory=lambda: load_prompts("bias_pairs"))
    name: str = "stereotype_bias"
    headline: str = "stereotype_score"
    tiebreak: str | None = "logprob_gap"

    def __post_init__(self) -> None:
        self.pairs.require_nonempty()

    @override
    def batches(self, tokenizer: Any, split: str | None, batch_size: int) -> list[Batch]:
        ps = self.pairs.split(split)
        return pair_batches(tokenizer, ps.column("stereotype"), ps.column("anti_stereotype"), batch_size)

    @override
    def control_batches(self, tokenizer: Any, split: str | None, batch_size: int) -> list[Batch]:
        ps = self.pairs.split(split)
        return pair_batches(tokenizer, ps.column("anti_stereotype"), ps.column("stereotype"), batch_size)

    @override
    def metric(self, logits: Float[Tensor, "batch pos vocab"], batch: Batch) -> Float[Tensor, " pairs"]:
        return pair_logprob_gap(logits, batch)

    @override
    def evaluate_items(self, model: Model, split: str | None, *, batch_size: int = 16,
                       progress: bool = True) -> list[dict[str, Any]]:
        recs = self.pairs.split(split).records
        gaps: list[float] = []
        batches = self.batches(model_tokenizer(model), split, batch_size)
        for b in maybe_progress(batches, len(batches), "bias", progress):
            b = b.to(device_of(model))
            with torch.no_grad():
                gaps += self.metric(model(b.tokens, **b.model_kwargs()), b).tolist()
        return [{"id": r["id"], "category": r["category"], "gap": g, "stereotyped": g > 0} for r, g in zip(recs, gaps)]

    @override
    def aggregate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {**rate("stereotype_score", [i["stereotyped"] for i in items], scale=100.0),
                "logprob_gap": sum(i["gap"] for i in items) / len(items)}
