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
from .scoring import SCORERS, score
from .selection import NeuronScores, NeuronSelection
from .stats import Reference
from .transplant import NeuronPatch

__all__ = ["NoGapError", "SearchResult", "iterative_scores", "measure_point", "measure_reference", "search_minimal"]



class NoGapError(ValueError):
    """Donor and target do not differ on the behaviour: there is nothing to transplant."""


def measure_reference(pair: ModelPair, behaviour: Behaviour, side_effects: Sequence[Behaviour] = (), *,
                      split: str = "validation", batch_size: int = 16, estimate: bool = False) -> Reference:
    """The donor's and the target's numbers on ``split`` (``{"donor": {...}, "target": {...}}``).

    Raises :class:`NoGapError` when they agree on ``behaviour.headline``: no transplant can close a gap
    that is not there. Run it before any long stage; it costs one evaluation of each model
    (``estimate``: each behaviour's cheap estimate, see :func:`~cnt_lens.evaluate.measure`).
    """
    kw = dict(batch_size=batch_size, estimate=estimate)
    reference = {"target": measure(pair.target, [behaviour, *side_effects], split, **kw),
                 "donor": measure(pair.donor, [behaviour, *side_effects], split, **kw)}
    head = behaviour.headline
    d, t = reference["donor"][head], reference["target"][head]
    if d == t or math.isnan(d - t):
        raise NoGapError(
            f"donor and target have the same {head} on {split}{' (estimated)' if estimate else ''} (donor {d}, "
            f"target {t}); no gap to close. Likely causes: the donor is not the model you meant (a cached "
            "fine-tune that did not take, a checkpoint of the target itself), the prompt set does not elicit the "
            "behaviour, or generation is broken (install the pinned set: bash scripts/setup)."
        )
    return reference


def measure_point(pair: ModelPair, behaviours: Sequence[Behaviour], scores: NeuronScores, selection: NeuronSelection,
                  alpha: float, reference: Reference, *, split: str = "validation", goal: float = 0.9,
                  constraint: Constraint | None = None, estimate: bool = False, batch_size: int = 16,
                  ) -> dict[str, Any]:
    """One frontier point: ``selection`` of ``scores`` applied at ``alpha``, measured on ``split``, then reverted.

    ``behaviours[0]`` is the transplanted behaviour (its headline defines ``gap_closed`` against
    ``reference``, which must be measured the same way: both estimated or both evaluated), the rest
    side effects. Keys: ``method``, ``k``, ``fraction``, ``alpha``, ``gap_closed``, ``goal_reached``,
    ``reached`` (goal reached and ``constraint`` holds), ``measured`` (``"estimate"`` or
    ``"evaluation"``) and every measured number.
    """
    head = behaviours[0].headline
    with NeuronPatch.from_pair(pair, selection, alpha).applied(pair.target):
        m = measure(pair.target, behaviours, split, batch_size=batch_size, estimate=estimate)
    closed = (m[head] - reference["target"][head]) / (reference["donor"][head] - reference["target"][head])
    goal_ok = bool(closed >= goal)
    return {"method": scores.method, "k": selection.n, "fraction": selection.n / pair.n_neurons, "alpha": alpha,
            "gap_closed": closed, "goal_reached": goal_ok,
            "reached": goal_ok and (constraint is None or bool(constraint(m, reference))),
            "measured": "estimate" if estimate else "evaluation", **m}


@dataclass
class SearchResult:
    """The smallest verified patch, and every point measured on the way (for plots).

    ``reference`` holds the donor's and target's evaluated numbers; ``estimated_reference`` their
    cheap estimates when the search screened with them (empty otherwise).
    """

    selection: NeuronSelection | None
    alpha: float | None
    metrics: dict[str, float] | None
    frontier: list[dict[str, Any]] = field(default_factory=list)
    reference: Reference = field(default_factory=dict)
    estimated_reference: Reference = field(default_factory=dict)

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
    screen: bool = False,
    estimated_reference: Reference | None = None,
    step: float = 1.25,
    slack: float = 0.1,
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

    ``screen``: run that search on the behaviours' cheap estimates
    (:meth:`~cnt_lens.Behaviour.estimate_items`, against the donor's and target's estimates), then
    evaluate in full only around its answer: from the estimated smallest k at its alpha, step k by
    ×``step`` down while the goal holds (or up once, then to the largest k), and bisect the bracket to
    ``tolerance``. The returned point is verified by the full evaluation, as without ``screen``,
    at a few evaluations instead of one per point; when it fails there, the estimate's next-best
    alpha is tried. An estimated point counts as reaching the goal within ``slack`` of it (gap
    fraction): the estimate only decides where to look, and one that falls a prompt short of the
    goal at the largest k must not hide an alpha from the search. When the estimate reaches the goal
    at no alpha, the search runs in full: an estimate that misreads the patched models (one reading a
    refusal's opening, for neurons ranked on its whole sentence) must not end the search unlooked.
    Each frontier point says how it was ``measured``. Without an estimated gap (donor and target estimated alike), or when every behaviour's estimate is its evaluation
    (:attr:`~cnt_lens.Behaviour.estimate_is_evaluation`), it is the full search. ``estimated_reference``
    (the result's, from an earlier search on the same split) saves estimating donor and target again.
    """
    total = pair.n_neurons
    k_max = _check_search(goal, alphas, max_fraction, min_k, total)
    if not 0 <= slack < goal:
        raise ValueError(f"slack is a share of the gap in [0, goal={goal}), got {slack}")
    behaviours = [behaviour, *side_effects]
    if reference is None:
        reference = measure_reference(pair, behaviour, side_effects, split=split, batch_size=batch_size)
    screen = screen and not all(b.estimate_is_evaluation for b in behaviours)  # else the estimate *is* the evaluation
    estimated = (estimated_reference or _estimated_reference(pair, behaviour, side_effects, split, batch_size)
                 if screen else {})
    frontier: list[dict[str, Any]] = []
    bar = progress_bar(desc="search_minimal", unit="point", enabled=progress)

    def select(k: int) -> NeuronSelection:
        return scores.top_k(max(1, k // pair.n_layers), per_layer=True) if per_layer else scores.top_k(k)

    def probe(estimate: bool, alpha: float) -> Callable[[int], tuple[bool, bool]]:
        """(goal reached, goal reached and constraint holds) at the top-k set and ``alpha``."""
        def at(k: int) -> tuple[bool, bool]:
            point = measure_point(pair, behaviours, scores, select(k), alpha, estimated if estimate else reference,
                                  split=split, goal=goal - slack if estimate else goal, constraint=constraint,
                                  estimate=estimate, batch_size=batch_size)
            frontier.append(point)
            bar.update(1)
            bar.set_postfix(k=point["k"], alpha=alpha, closed=f"{point['gap_closed']:.2f}", by=point["measured"])
            return point["goal_reached"], point["reached"]
        return at

    candidates = _alpha_sweep(lambda a: probe(bool(estimated), a), alphas, k_max, min_k, tolerance)
    screened = bool(estimated) and bool(candidates)
    if estimated and not candidates:  # the estimate reached the goal nowhere: it cannot say where to look
        candidates = _alpha_sweep(lambda a: probe(False, a), alphas, k_max, min_k, tolerance)
    if screened:  # confirm the estimate's answers in full, smallest first
        best = next(((k, a) for k0, a in reversed(candidates)
                     if (k := _refine_k(probe(False, a), select(k0).n, k_max, min_k, tolerance, step)) is not None),
                    None)
    else:
        best = candidates[-1] if candidates else None
    bar.close()
    if best is None:
        return SearchResult(None, None, None, frontier, reference, estimated)
    k, alpha = best
    sel = select(k)
    point = next(p for p in reversed(frontier)
                 if p["k"] == sel.n and p["alpha"] == alpha and p["measured"] == "evaluation")
    return SearchResult(sel, alpha, {key: v for key, v in point.items() if isinstance(v, float)}, frontier,
                        reference, estimated)


def _estimated_reference(pair: ModelPair, behaviour: Behaviour, side_effects: Sequence[Behaviour], split: str,
                         batch_size: int) -> Reference:
    """Donor's and target's cheap estimates; empty when the estimates show no gap (search in full then)."""
    try:
        return measure_reference(pair, behaviour, side_effects, split=split, batch_size=batch_size, estimate=True)
    except NoGapError:
        return {}


def _alpha_sweep(probe: Callable[[float], Callable[[int], tuple[bool, bool]]], alphas: Sequence[float], k_max: int,
                 min_k: int, tolerance: float) -> list[tuple[int, float]]:
    """Each alpha's smallest passing k below the best so far: the improving (k, alpha) points, best last."""
    found: list[tuple[int, float]] = []
    for alpha in alphas:
        hi = k_max if not found else found[-1][0] - 1
        if hi >= min_k:
            k = _smallest_k(probe(alpha), hi, min_k, tolerance)
            if k is not None:
                found.append((k, alpha))
    return found


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
    return _bisect(probe, min_k - 1, hi, ok, tolerance)


def _bisect(probe: Callable[[int], tuple[bool, bool]], lo: int, hi: int, ok: bool, tolerance: float) -> int | None:
    """Geometric bisection of (``lo`` misses, ``hi`` reaches the goal; ``ok``: ``hi`` also counts) to ``tolerance``."""
    while hi - lo > 1 and hi > (1 + tolerance) * max(lo, 1):
        mid = max(lo + 1, min(hi - 1, round(math.sqrt(max(lo, 1) * hi))))
        goal_ok, ok_mid = probe(mid)
        if goal_ok:
            hi, ok = mid, ok_mid
        else:
            lo = mid
    return hi if ok else None


def _refine_k(probe: Callable[[int], tuple[bool, bool]], start: int, k_max: int, min_k: int, tolerance: float,
              step: float) -> int | None:
    """:func:`_smallest_k` started from a guess: step ×``step`` from ``start`` to a bracket, then bisect it.

    Down, it steps while the goal holds. Up, it tries one step and then ``k_max`` at once: the goal
    is monotone in k, so a miss at ``k_max`` ends the search at this alpha (an estimate that hopes
    too much, or an alpha that never reaches the goal, costs three probes instead of a climb of
    ×``step`` steps to ``k_max``). Costs about two probes more than the bracket's bisection when
    ``start`` is within one step of the answer, instead of a bisection from the whole range.
    """
    if step <= 1:
        raise ValueError(f"step must be > 1, got {step}")
    goal_ok, ok = probe(start)
    if goal_ok:
        hi, lo = start, min_k - 1
        while hi > min_k:
            down = max(min_k, min(hi - 1, math.floor(hi / step)))
            goal_ok, ok_down = probe(down)
            if not goal_ok:
                lo = down
                break
            hi, ok = down, ok_down
        return _bisect(probe, lo, hi, ok, tolerance)
    up = min(k_max, max(start + 1, math.ceil(start * step)))
    for lo, hi in ((start, up), (up, k_max)):  # one step up, then the top
        if hi <= lo:
            break
        goal_ok, ok = probe(hi)
        if goal_ok:
            return _bisect(probe, lo, hi, ok, tolerance)
    return None


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
    (e.g. ``contrast=1.0, preserve=[Utility()], preserve_weight=30``). The donor's metrics are read
    in the first round only (``donor_metrics``: weight attribution needs the donor's weights, not its
    forward pass, and the donor does not change).
    """
    if rounds < 1 or not 0 < budget <= 1:
        raise ValueError("rounds must be ≥ 1 and budget in (0, 1]")
    per_round = max(1, round(budget * pair.n_neurons / rounds))
    if "donor_metrics" in SCORERS[method].options:  # the donor never changes between rounds: run it once
        score_kwargs.setdefault("donor_metrics", {})
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
