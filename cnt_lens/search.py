"""Minimal transplant search: the fewest neurons (and the scale) that reach a behavioural goal.

Every candidate is *verified*: its patch is applied to the target, the behaviour is evaluated on
a held-out split (validation by default, never the split the scores came from), and the patch is
reverted. The goal is a fraction of the donor–target gap in the behaviour's headline number::

    closed = (patched − target) / (donor − target)  ≥  goal

which reads the same for function addition (gap > 0) and deletion (gap < 0).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .behaviours import Behaviour
from .constraints import Constraint
from .evaluate import measure
from .models import ModelPair
from .progress import progress_bar
from .scoring import score
from .selection import NeuronScores, NeuronSelection
from .stats import Block, Reference
from .transplant import NeuronPatch

__all__ = ["NoGapError", "SearchResult", "iterative_scores", "measure_reference", "search_minimal"]



class NoGapError(ValueError):
    """Donor and target do not differ on the behaviour: there is nothing to transplant."""


def measure_reference(pair: ModelPair, behaviour: Behaviour, side_effects: Sequence[Behaviour] = (), *,
                      split: str = "validation", batch_size: int = 16) -> Reference:
    """The donor's and the target's numbers on ``split`` (``{"donor": {...}, "target": {...}}``).

    Raises :class:`NoGapError` when they agree on ``behaviour.headline``: no transplant can close a gap
    that is not there. Run it before any long stage; it costs one evaluation of each model.
    """
    reference = {"target": measure(pair.target, [behaviour, *side_effects], split, batch_size=batch_size),
                 "donor": measure(pair.donor, [behaviour, *side_effects], split, batch_size=batch_size)}
    head = behaviour.headline
    d, t = reference["donor"][head], reference["target"][head]
    if d == t or math.isnan(d - t):
        raise NoGapError(
            f"donor and target have the same {head} on {split} (donor {d}, target {t}); no gap to close. "
            "Likely causes: the donor is not the model you meant (a cached fine-tune that did not take, a "
            "checkpoint of the target itself), the prompt set does not elicit the behaviour, or generation is "
            "broken (install the pinned set: bash scripts/setup)."
        )
    return reference


@dataclass
class SearchResult:
    """The smallest verified patch, and every point measured on the way (for plots)."""

    selection: NeuronSelection | None
    alpha: float | None
    metrics: dict[str, float] | None
    frontier: list[dict[str, Any]] = field(default_factory=list)
    reference: Reference = field(default_factory=dict)

    @property
    def found(self) -> bool:
        """Whether some point reached the goal."""
        return self.selection is not None

    def patch(self, pair: ModelPair, **kwargs: Any) -> NeuronPatch:
        """The patch of the found point (selection and alpha); raises when none was found."""
        if self.selection is None or self.alpha is None:
            raise ValueError("the search reached no goal; nothing to build a patch from")
        return NeuronPatch.from_pair(pair, self.selection, self.alpha, **kwargs)


def search_minimal(
    pair: ModelPair,
    behaviour: Behaviour,
    scores: NeuronScores,
    *,
    goal: float = 0.9,
    split: str = "validation",
    alphas: Sequence[float] = (1.0, 2.0, 4.0),
    max_fraction: float = 0.05,
    min_k: int = 1,
    tolerance: float = 0.1,
    per_layer: bool = False,
    side_effects: Sequence[Behaviour] = (),
    constraint: Constraint | None = None,
    reference: Reference | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> SearchResult:
    """Smallest top-k set of ``scores`` (and the alpha in ``alphas``) that closes ``goal`` of the gap.

    For each alpha, the top ``max_fraction`` of neurons is tried first; if it reaches the goal,
    bisection over k (on a geometric scale, stopping when the bracket is within ``tolerance``)
    finds the smallest k that does, and that k counts if it also meets ``constraint``. The
    bisection follows the goal alone: side effects (harmless refusal, NLL) grow with k, so a
    constraint can fail at the largest k and hold at the smallest one that reaches the goal.
    Alphas after the first only search below the best k so far.
    ``side_effects`` (e.g. :class:`~cnt_lens.Utility`) are evaluated at every point too, and
    ``constraint(metrics, reference) -> bool`` (e.g. harmless refusal no higher than the donor's;
    ``reference`` holds the target's and donor's numbers on the same split) must hold for a point
    to count as reaching the goal. ``reference`` (from :func:`measure_reference` on the same split)
    saves measuring donor and target again. Returns the whole measured frontier.
    """
    total = pair.n_neurons
    k_max = _check_search(goal, alphas, max_fraction, min_k, total)

    def evaluate(model: Any) -> Block:
        return measure(model, [behaviour, *side_effects], split, batch_size=batch_size)

    if reference is None:
        reference = measure_reference(pair, behaviour, side_effects, split=split, batch_size=batch_size)
    head = behaviour.headline
    gap = reference["donor"][head] - reference["target"][head]
    frontier: list[dict[str, Any]] = []
    bar = progress_bar(desc="search_minimal", unit="eval", enabled=progress)

    def select(k: int) -> NeuronSelection:
        return scores.top_k(max(1, k // pair.n_layers), per_layer=True) if per_layer else scores.top_k(k)

    def measure_at(k: int, alpha: float) -> tuple[bool, bool]:
        """(goal reached, goal reached and constraint holds) at the top-k set and alpha."""
        sel = select(k)
        with NeuronPatch.from_pair(pair, sel, alpha).applied(pair.target):
            m = evaluate(pair.target)
        closed = (m[head] - reference["target"][head]) / gap
        goal_ok = closed >= goal
        ok = goal_ok and (constraint is None or constraint(m, reference))
        frontier.append({"method": scores.method, "k": sel.n, "fraction": sel.n / total, "alpha": alpha,
                         "gap_closed": closed, "reached": ok, **m})
        bar.update(1)
        bar.set_postfix(k=sel.n, alpha=alpha, closed=f"{closed:.2f}")
        return goal_ok, ok

    best: tuple[int, float] | None = None
    for alpha in alphas:
        hi = k_max if best is None else best[0] - 1
        if hi >= min_k:
            found = _smallest_k(lambda k: measure_at(k, alpha), hi, min_k, tolerance)
            best = (found, alpha) if found is not None else best
    bar.close()
    if best is None:
        return SearchResult(None, None, None, frontier, reference)
    k, alpha = best
    sel = select(k)
    point = next(p for p in reversed(frontier) if p["k"] == sel.n and p["alpha"] == alpha)
    return SearchResult(sel, alpha, {key: v for key, v in point.items() if isinstance(v, float)}, frontier, reference)


def _check_search(goal: float, alphas: Sequence[float], max_fraction: float, min_k: int, total: int) -> int:
    """Validate :func:`search_minimal`'s settings; return the largest k it may try."""
    if not (isinstance(goal, (int, float)) and 0 < goal <= 1.5):
        raise ValueError(f"goal is a fraction of the donor–target gap in (0, 1.5], got {goal}")
    if not alphas:
        raise ValueError("alphas is empty")
    bad = [a for a in alphas if not (isinstance(a, (int, float)) and math.isfinite(a) and a > 0)]
    if bad:
        raise ValueError(f"alphas must be finite and > 0, got {bad}")
    if not (isinstance(max_fraction, (int, float)) and 0 < max_fraction <= 1):
        raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}")
    k_max = round(max_fraction * total)
    if k_max < min_k:
        raise ValueError(f"max_fraction={max_fraction} allows {k_max} of {total} neurons, fewer than "
                         f"min_k={min_k}; raise it to at least {min_k / total:.2g}")
    return k_max


def _smallest_k(probe: Callable[[int], tuple[bool, bool]], hi: int, min_k: int, tolerance: float) -> int | None:
    """Smallest k ≤ ``hi`` (within ``tolerance``) whose probe reaches the goal, if it also counts; else None.

    ``probe(k)`` returns (goal reached, goal reached and constraint holds). Bisection (geometric)
    follows the goal alone, which is monotone in k; side effects grow with k, so a constraint that
    fails at the largest k may hold at the smallest k that reaches the goal.
    """
    goal_ok, ok = probe(hi)
    if not goal_ok:
        return None
    lo = min_k - 1  # largest k known (or assumed) to miss the goal
    while hi - lo > 1 and hi > (1 + tolerance) * max(lo, 1):
        mid = max(lo + 1, min(hi - 1, round(math.sqrt(max(lo, 1) * hi))))
        goal_ok, ok_mid = probe(mid)
        if goal_ok:
            hi, ok = mid, ok_mid
        else:
            lo = mid
    return hi if ok else None


def iterative_scores(
    pair: ModelPair,
    behaviour: Behaviour,
    *,
    budget: float = 0.05,
    rounds: int = 2,
    alpha: float = 4.0,
    method: str = "weight_attribution",
    split: str = "train",
    progress: bool = True,
    **score_kwargs: Any,
) -> NeuronScores:
    """Greedy, re-scored selection: a ranking whose prefixes are chosen in rounds.

    Round ``r`` scores all neurons *on the target as patched by the earlier rounds* (gradients at
    the new point, so neurons that only matter once others are in place can rise), takes the best
    ``budget / rounds`` not yet chosen, and applies them at ``alpha`` before the next round. The
    target is restored at the end. The returned scores rank round-1 picks first (in their round's
    order), then round-2 picks, …, then every other neuron by the last round's scores, so
    :func:`search_minimal` can bisect over its prefixes. ``score_kwargs`` go to :func:`score`
    (e.g. ``contrast=1.0, preserve=[Utility()], preserve_weight=30``).
    """
    if rounds < 1 or not 0 < budget <= 1:
        raise ValueError("rounds must be ≥ 1 and budget in (0, 1]")
    per_round = max(1, round(budget * pair.n_neurons / rounds))
    chosen = NeuronSelection.empty(pair.n_layers, pair.d_mlp)
    order: list[torch.Tensor] = []
    last: NeuronScores | None = None
    history = []
    with contextlib.ExitStack() as applied:  # every round's patch comes off the target on the way out
        for r in range(rounds):
            last = score(pair, behaviour, method, split=split, progress=progress, **score_kwargs)
            vals = last.ranked().flatten().masked_fill(chosen.mask.flatten(), float("-inf"))
            idx = vals.topk(per_round).indices  # best first
            order.append(idx)
            pick = NeuronSelection(torch.zeros(pair.n_neurons, dtype=torch.bool).index_fill(0, idx, True)
                                   .view(pair.n_layers, pair.d_mlp), source=f"{method} round {r}")
            applied.enter_context(NeuronPatch.from_pair(pair, pick, alpha).applied(pair.target))
            chosen = chosen | pick
            history.append({"round": r, "picked": pick.n, "metric_target": last.meta.get("metric_target")})
    assert last is not None
    n = pair.n_neurons
    rest = last.ranked().flatten().masked_fill(chosen.mask.flatten(), float("-inf"))
    ranking = torch.cat([*order, rest.argsort(descending=True)[: n - chosen.n]])
    values = torch.empty(n)
    values[ranking] = torch.arange(n, 0, -1, dtype=torch.float32)  # rank-valued: n for the first pick
    meta = {**{k: v for k, v in last.meta.items() if k not in ("metric_donor", "metric_target")},
            "rounds": rounds, "budget": budget, "round_alpha": alpha, "base_method": method, "history": history}
    return NeuronScores(values.view(pair.n_layers, pair.d_mlp), f"iterative_{method}", behaviour.name,
                        last.n_prompts, meta)
