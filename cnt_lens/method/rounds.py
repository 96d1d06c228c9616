"""Re-scored rankings: neurons chosen in rounds, each round scored on the target as the rounds before patched it.

A single scoring pass ranks every neuron at the unpatched target; neurons that only matter once others
are in place rank low there. :func:`iterative_scores` re-scores after applying each round's picks and
returns one ranking whose prefixes :func:`~cnt_lens.method.search.search_minimal` bisects over;
:func:`next_overlap` measures how much two rounds agree on what to pick next (the early stop).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from cnt_lens.behaviours.base import Behaviour
from cnt_lens.method.scoring import SCORERS, score
from cnt_lens.method.selection import NeuronScores, NeuronSelection
from cnt_lens.method.transplant import NeuronPatch
from cnt_lens.models.pair import ModelPair

__all__ = ["iterative_scores", "next_overlap"]


def iterative_scores(
    pair: ModelPair,
    behaviour: Behaviour,
    *,
    budget: float = 0.05,
    rounds: int = 2,
    alpha: float = 4.0,
    method: str = "weight_attribution",
    stop_overlap: float | None = None,
    **score_kwargs: Any,
) -> NeuronScores:
    """Greedy, re-scored selection: a ranking whose prefixes are chosen in rounds.

    Round ``r`` scores all neurons *on the target as patched by the earlier rounds* (gradients at
    the new point, so neurons that only matter once others are in place can rise), takes the best
    ``budget / rounds`` not yet chosen, and applies them at ``alpha`` before the next round. The
    target is restored at the end. The returned scores rank round-1 picks first (in their round's
    order), then round-2 picks, …, then every other neuron by the last round's scores, so
    :func:`~cnt_lens.method.search.search_minimal` can bisect over its prefixes. ``score_kwargs`` go to
    :func:`~cnt_lens.method.scoring.score`
    (e.g. ``progress=False``, ``contrast=1.0, preserve=[Utility()], preserve_weight=30``; the split is train unless they say). The donor's metrics are read
    in the first round only (``donor_metrics``: weight attribution needs the donor's weights, not its
    forward pass, and the donor does not change).

    A round's ``overlap`` (``meta["history"]``, from round 2): the share of the budget left that it and the round
    before would both pick next (:func:`next_overlap`). Once it reaches ``stop_overlap`` the rest of the budget
    comes from that round's scores (``meta["rounds_run"]``: how many rounds ran).
    """
    if rounds < 1 or not 0 < budget <= 1:
        raise ValueError("rounds must be ≥ 1 and budget in (0, 1]")
    if stop_overlap is not None and not 0 < stop_overlap <= 1:
        raise ValueError(f"stop_overlap is a share of the next picks in (0, 1] (or None: every round), "
                         f"got {stop_overlap!r}")
    total = max(1, round(budget * pair.n_neurons))
    per_round = max(1, round(budget * pair.n_neurons / rounds))
    if "donor_metrics" in SCORERS[method].options:  # the donor never changes between rounds: run it once
        score_kwargs.setdefault("donor_metrics", {})
    chosen = NeuronSelection.empty(pair.n_layers, pair.d_mlp)
    order: list[torch.Tensor] = []
    last: NeuronScores | None = None
    history: list[dict[str, Any]] = []
    with contextlib.ExitStack() as applied:  # every round's patch comes off the target on the way out
        for r in range(rounds):
            previous, last = last, score(pair, behaviour, method, **{"split": "train", **score_kwargs})
            overlap = None if previous is None else next_overlap(previous, last, chosen, total - chosen.n)
            history.append({"round": r, "metric_target": last.meta.get("metric_target"), "overlap": overlap})
            if stop_overlap is not None and overlap is not None and overlap >= stop_overlap:
                break
            vals = last.ranked().flatten().masked_fill(chosen.mask.flatten(), float("-inf"))
            idx = vals.topk(per_round).indices  # best first
            order.append(idx)
            pick = NeuronSelection(torch.zeros(pair.n_neurons, dtype=torch.bool).index_fill(0, idx, True)
                                   .view(pair.n_layers, pair.d_mlp), source=f"{method} round {r}")
            applied.enter_context(NeuronPatch.from_pair(pair, pick, alpha).applied(pair.target))
            chosen = chosen | pick
            history[-1]["picked"] = pick.n
    assert last is not None
    n = pair.n_neurons
    rest = last.ranked().flatten().masked_fill(chosen.mask.flatten(), float("-inf"))
    ranking = torch.cat([*order, rest.argsort(descending=True)[: n - chosen.n]])
    values = torch.empty(n)
    values[ranking] = torch.arange(n, 0, -1, dtype=torch.float32)  # rank-valued: n for the first pick
    meta = {**{k: v for k, v in last.meta.items() if k not in ("metric_donor", "metric_target")},
            "rounds": rounds, "rounds_run": len(history), "stop_overlap": stop_overlap, "budget": budget,
            "round_alpha": alpha, "base_method": method, "history": history}
    return NeuronScores(values.view(pair.n_layers, pair.d_mlp), f"iterative_{method}", behaviour.name,
                        last.n_prompts, meta)


def next_overlap(before: NeuronScores, after: NeuronScores, chosen: NeuronSelection, count: int) -> float:
    """Share of the next ``count`` picks outside ``chosen`` that ``before`` and ``after`` share (any order; 1.0 if none)."""
    if count < 1:
        return 1.0
    picks = [s.ranked().flatten().masked_fill(chosen.mask.flatten(), float("-inf")).topk(count).indices
             for s in (before, after)]
    return len(set(picks[0].tolist()) & set(picks[1].tolist())) / count
