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
from dataclasses import dataclass, field, replace
from typing import Any, Callable, NamedTuple, Sequence

import torch

from cnt_lens.behaviours.base import Behaviour
from cnt_lens.behaviours.constraints import Constraint
from cnt_lens.core.errors import CntLensError
from cnt_lens.core.progress import progress_bar
from cnt_lens.core.records import Point, Reference
from cnt_lens.method.config import SearchConfig
from cnt_lens.method.evaluate import measure
from cnt_lens.method.scoring import SCORERS, score
from cnt_lens.method.selection import NeuronScores, NeuronSelection
from cnt_lens.method.transplant import NeuronPatch
from cnt_lens.models.pair import ModelPair

__all__ = ["NoGapError", "SearchResult", "iterative_scores", "measure_point", "next_overlap", "measure_reference", "search_minimal"]



class NoGapError(CntLensError, ValueError):
    """Donor and target do not differ on the behaviour: there is nothing to transplant."""


def measure_reference(pair: ModelPair, behaviour: Behaviour, side_effects: Sequence[Behaviour] = (), *,
                      split: str = "validation", batch_size: int = 16, estimate: bool = False) -> Reference:
    """The donor's and the target's numbers on ``split``, as a :class:`~cnt_lens.core.records.Reference`.

    Raises :class:`NoGapError` when they agree on ``behaviour.headline``: no transplant can close a gap
    that is not there. Run it before any long stage; it costs one evaluation of each model
    (``estimate``: each behaviour's cheap estimate, see :func:`~cnt_lens.method.evaluate.measure`).
    """
    kw = dict(batch_size=batch_size, estimate=estimate)
    target = measure(pair.target, [behaviour, *side_effects], split, **kw)
    reference = Reference(donor=measure(pair.donor, [behaviour, *side_effects], split, **kw), target=target,
                          split=split, measured="estimate" if estimate else "evaluation")
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
                  alpha: float, reference: Reference, config: SearchConfig = SearchConfig(),
                  constraint: Constraint | None = None) -> Point:
    """One frontier point: ``selection`` of ``scores`` applied at ``alpha``, measured, then reverted.

    ``behaviours[0]`` is the transplanted behaviour (its headline defines ``gap_closed`` against
    ``reference``), the rest side effects. The point is measured as ``reference`` was: on its split,
    estimated when it holds estimates. ``config`` gives the goal and the batch size; ``acceptable``
    says whether ``constraint`` holds.
    """
    head = behaviours[0].headline
    estimate = reference.measured == "estimate"
    with NeuronPatch.from_pair(pair, selection, alpha).applied(pair.target):
        m = measure(pair.target, behaviours, reference.split, batch_size=config.batch_size, estimate=estimate)
    closed = (m[head] - reference.target[head]) / (reference.donor[head] - reference.target[head])
    return Point(scores.method, k=selection.n, fraction=selection.n / pair.n_neurons, alpha=alpha,
                 gap_closed=closed, goal_reached=bool(closed >= config.goal),
                 acceptable=constraint is None or bool(constraint(m, reference)), measured=reference.measured,
                 numbers=m)


@dataclass
class SearchResult:
    """The smallest verified patch, and every point measured on the way (for plots).

    ``reference`` holds the donor's and target's evaluated numbers, and their cheap estimates
    (``reference.estimate``) when the search screened with them.
    """

    selection: NeuronSelection | None
    alpha: float | None
    metrics: dict[str, float] | None
    frontier: list[Point] = field(default_factory=list)
    reference: Reference | None = None

    @property
    def estimated_reference(self) -> Reference | None:
        """The donor's and target's estimates the search screened with (``None`` when it did not)."""
        return None if self.reference is None else self.reference.estimate

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
    config: SearchConfig = SearchConfig(),
    *,
    side_effects: Sequence[Behaviour] = (),
    constraint: Constraint | None = None,
    reference: Reference | None = None,
    progress: bool = True,
) -> SearchResult:
    """Smallest top-k set of ``scores`` (and the alpha in ``config.alphas``) that closes ``goal`` of the gap acceptably.

    A point is acceptable when ``constraint(metrics, reference) -> bool`` holds (e.g. harmless refusal
    no higher than the donor's, utility NLL kept; ``reference`` holds the target's and donor's numbers
    on the same split, from :func:`measure_reference`, measured here when not given). Both the goal
    and the side effects grow with k, so at each alpha one geometric bisection over k (stopping when
    the bracket is within ``tolerance``) keeps a lower end that is acceptable and short of the goal
    and an upper end that is not: it ends at the smallest k reaching the goal when that k is
    acceptable (a constraint failing at the largest k may hold there), and otherwise at the
    constraint's boundary, the largest acceptable k — the best acceptable point of that alpha, which
    is on the returned frontier when no alpha reaches the goal. The first alpha bisects the whole
    range (up to ``max_fraction`` of the neurons); each later one starts from the answer before it
    (steps of ×``step`` to a bracket, then bisection) and, once some alpha has reached the goal, only
    looks below its k. ``side_effects`` (e.g. :class:`~cnt_lens.Utility`) are evaluated at every
    point. Returns the whole measured frontier; ``found`` says whether the goal was reached.

    ``screen``: run that search on the behaviours' cheap estimates
    (:meth:`~cnt_lens.Behaviour.estimate_items`, against the donor's and target's estimates), then
    evaluate in full only around its answers: from an estimated answer, step k by ×``step`` to a
    bracket and bisect it to ``tolerance``. Goal-reaching answers are confirmed smallest first; when
    the estimate reached the goal at no alpha, only the alpha whose acceptable answer closed the most
    of the estimated gap is refined in full, to its constraint boundary. An estimated point counts as
    reaching the goal within ``slack`` of it (gap fraction): the estimate only decides where to look.
    When the estimate finds nothing acceptable, it cannot say where to look and the search runs in
    full; when it reached the goal nowhere and the refinement in full reaches it (an estimate reading a
    refusal's opening, for neurons ranked on its whole sentence), the other alphas are searched in full
    below that k. The estimate's own bisection stops within one ×``step`` (or ``tolerance``, when
    wider). Each frontier point says how it was ``measured``.
    Without an estimated gap (donor and target estimated alike), or when every behaviour's estimate
    is its evaluation (:attr:`~cnt_lens.Behaviour.estimate_is_evaluation`), it is the full search.
    A ``reference`` that carries its estimates (``result.reference`` of an earlier search on the same
    split) saves estimating donor and target again. Every setting is ``config``'s
    (:class:`~cnt_lens.method.config.SearchConfig`).
    """
    c = config
    alphas, min_k, tolerance, step = c.alphas, c.min_k, c.tolerance, c.step
    k_max = _check_search(c.goal, c.max_fraction, min_k, pair.n_neurons, c.slack)
    behaviours = [behaviour, *side_effects]
    if reference is None:
        reference = measure_reference(pair, behaviour, side_effects, split=c.split, batch_size=c.batch_size)
    screen = c.screen and not all(b.estimate_is_evaluation for b in behaviours)  # else the estimate *is* it
    estimated = (reference.estimate or _estimated_reference(pair, behaviour, side_effects, c)) if screen else None
    reference = replace(reference, estimate=estimated)
    estimate_config = replace(c, goal=c.goal - c.slack) if estimated else c
    frontier: list[Point] = []
    bar = progress_bar(desc="search_minimal", unit="point", enabled=progress)

    def select(k: int) -> NeuronSelection:
        return scores.top_k(max(1, k // pair.n_layers), per_layer=True) if c.per_layer else scores.top_k(k)

    def probe(estimate: bool, alpha: float) -> Probe:
        """(goal reached, constraint holds) at the top-k set and ``alpha``, estimated or evaluated in full."""
        def at(k: int) -> tuple[bool, bool]:
            point = measure_point(pair, behaviours, scores, select(k), alpha, estimated if estimate else reference,
                                  estimate_config if estimate else c, constraint)
            frontier.append(point)
            bar.update(1)
            bar.set_postfix(k=point["k"], alpha=alpha, closed=f"{point['gap_closed']:.2f}", by=point["measured"])
            return point["goal_reached"], point["acceptable"]
        return at

    def full_sweep(start: _Candidate | None = None) -> _Candidate | None:
        found = _alpha_sweep(lambda a: probe(False, a), alphas, k_max, min_k, tolerance, step, start)
        return found[-1] if found and found[-1].found else None

    if not estimated:
        best = full_sweep()
    else:
        # the estimate's answers only need to be within one ×step of the truth: the full refinement brackets
        # them in steps of that size anyway
        candidates = _alpha_sweep(lambda a: probe(True, a), alphas, k_max, min_k, max(tolerance, step - 1), step)
        if not candidates:  # nothing acceptable by estimate, even at the smallest k: it cannot say where to look
            best = full_sweep()
        else:
            best = _confirm(candidates, lambda c: probe(False, c.alpha), select, frontier, k_max, min_k,
                            tolerance, step)
            if best is not None and not any(c.found for c in candidates):
                best = full_sweep(best)  # the evaluation reached a goal the estimate missed: the other alphas too
    bar.close()
    if best is None:
        return SearchResult(None, None, None, frontier, reference)
    sel = select(best.k)
    point = next(p for p in reversed(frontier)
                 if p["k"] == sel.n and p["alpha"] == best.alpha and p["measured"] == "evaluation")
    return SearchResult(sel, best.alpha, {key: v for key, v in point.items() if isinstance(v, float)}, frontier,
                        reference)


def _estimated_reference(pair: ModelPair, behaviour: Behaviour, side_effects: Sequence[Behaviour],
                         config: SearchConfig) -> Reference | None:
    """Donor's and target's cheap estimates; ``None`` when the estimates show no gap (search in full then)."""
    try:
        return measure_reference(pair, behaviour, side_effects, split=config.split, batch_size=config.batch_size,
                                 estimate=True)
    except NoGapError:
        return None


#: ``probe(k) -> (goal reached, constraint holds)`` at the top-k set (one alpha, one way of measuring)
Probe = Callable[[int], tuple[bool, bool]]


class _Answer(NamedTuple):
    """One alpha's answer: the smallest k reaching the goal acceptably (``found``), or else the largest acceptable k."""

    k: int
    found: bool


class _Candidate(NamedTuple):
    """An alpha's answer in a sweep (see :class:`_Answer`), with its alpha."""

    k: int
    alpha: float
    found: bool


def _short(goal_ok: bool, ok: bool) -> bool:
    """Acceptable and short of the goal: the answer lies at a larger k."""
    return ok and not goal_ok


def _alpha_sweep(probe: Callable[[float], Probe], alphas: Sequence[float], k_max: int, min_k: int, tolerance: float,
                 step: float, start: _Candidate | None = None) -> list[_Candidate]:
    """Each alpha's answer, in order: the improving goal-reaching points (best last), after the acceptable-only ones.

    Once some alpha reaches the goal, later alphas only look below its k; until then each alpha's answer
    is its largest acceptable k. An alpha after the first starts from the answer before it (side effects
    and the goal move together with alpha, so the next answer is usually a step away) instead of
    bisecting the whole range again. ``start``: a goal-reaching answer already known (its alpha is skipped).
    """
    out: list[_Candidate] = [start] if start is not None else []
    for alpha in alphas:
        if start is not None and alpha == start.alpha:
            continue
        done = next((c for c in reversed(out) if c.found), None)
        hi = k_max if done is None else done.k - 1
        if hi < min_k:
            continue
        ans = (_from_top(probe(alpha), hi, min_k, tolerance) if not out
               else _refine_k(probe(alpha), min(out[-1].k, hi), hi, min_k, tolerance, step))
        if ans is not None and (ans.found or done is None):
            out.append(_Candidate(ans.k, alpha, ans.found))
    return out


def _confirm(candidates: list[_Candidate], probe: Callable[[_Candidate], Probe], select: Callable[[int], Any],
             frontier: list[Point], k_max: int, min_k: int, tolerance: float,
             step: float) -> _Candidate | None:
    """Evaluate the screen's candidates in full, refining each from its estimated k; the first that reaches the goal.

    Goal-reaching candidates go first, smallest k first. When the estimate reached the goal nowhere, only the
    acceptable candidate with the largest estimated gap closed is refined in full (to the constraint's
    boundary, where the best acceptable point lies): one alpha's few evaluations, not every alpha's.
    """
    order = [c for c in reversed(candidates) if c.found]
    if not order:
        def estimated_gap(c: _Candidate) -> float:
            n = select(c.k).n
            return next(p["gap_closed"] for p in reversed(frontier)
                        if p["k"] == n and p["alpha"] == c.alpha and p["measured"] == "estimate")
        order = [max(candidates, key=estimated_gap)]
    for c in order:
        ans = _refine_k(probe(c), select(c.k).n, k_max, min_k, tolerance, step)
        if ans is not None and ans.found:
            return _Candidate(ans.k, c.alpha, True)
    return None


def _check_search(goal: float, max_fraction: float, min_k: int, total: int, slack: float) -> int:
    """What :class:`~cnt_lens.method.config.SearchConfig` cannot check alone (it knows no model); the largest k to try."""
    if not 0 <= slack < goal:
        raise ValueError(f"slack is a share of the gap in [0, goal={goal}), got {slack}")
    k_max = round(max_fraction * total)
    if k_max < min_k:
        raise ValueError(f"max_fraction={max_fraction} allows {k_max} of {total} neurons, fewer than "
                         f"min_k={min_k}; raise it to at least {min_k / total:.2g}")
    return k_max


def _from_top(probe: Probe, hi: int, min_k: int, tolerance: float) -> _Answer | None:
    """One alpha's answer in ``[min_k, hi]`` by a geometric bisection from the whole range.

    The bisection keeps ``lo`` acceptable and short of the goal and ``hi`` not: ``hi`` either reaches
    the goal acceptably or breaks the constraint. Both the goal and the side effects grow with k, so it
    ends at the smallest k reaching the goal when that k is acceptable (a constraint that fails at the
    largest k may hold there), and otherwise at the constraint's boundary, the best acceptable point.
    """
    goal_ok, ok = probe(hi)
    if _short(goal_ok, ok):
        return _Answer(hi, False)
    return _bisect(probe, min_k - 1, hi, goal_ok and ok, min_k, tolerance)


def _bisect(probe: Probe, lo: int, hi: int, found: bool, min_k: int, tolerance: float) -> _Answer | None:
    """Geometric bisection of (``lo`` short, ``hi`` not; ``found``: ``hi`` reaches the goal acceptably) to ``tolerance``.

    ``lo = min_k - 1`` stands for the unpatched target, acceptable and short of the goal by definition.
    """
    while hi - lo > 1 and hi > (1 + tolerance) * max(lo, 1):
        mid = max(lo + 1, min(hi - 1, round(math.sqrt(max(lo, 1) * hi))))
        goal_ok, ok = probe(mid)
        if _short(goal_ok, ok):
            lo = mid
        else:
            hi, found = mid, goal_ok and ok
    if found:
        return _Answer(hi, True)
    return _Answer(lo, False) if lo >= min_k else None


def _refine_k(probe: Probe, start: int, k_max: int, min_k: int, tolerance: float, step: float) -> _Answer | None:
    """:func:`_from_top` started from a guess: step ×``step`` from ``start`` to a bracket, then bisect it.

    Down, it steps while the point is not short of the goal (it reaches it, or breaks the constraint).
    Up, it tries one step and then ``k_max`` at once: short of the goal and acceptable at ``k_max`` ends
    the search at this alpha with ``k_max`` (an estimate that hopes too much, or an alpha that never
    reaches the goal, costs three probes instead of a climb of ×``step`` steps). Costs about two probes
    more than the bracket's bisection when ``start`` is within one step of the answer, instead of a
    bisection of the whole range.
    """
    if step <= 1:
        raise ValueError(f"step must be > 1, got {step}")
    goal_ok, ok = probe(start)
    if not _short(goal_ok, ok):
        hi, found, lo = start, goal_ok and ok, min_k - 1
        while hi > min_k:
            down = max(min_k, min(hi - 1, math.floor(hi / step)))
            goal_ok, ok = probe(down)
            if _short(goal_ok, ok):
                lo = down
                break
            hi, found = down, goal_ok and ok
        return _bisect(probe, lo, hi, found, min_k, tolerance)
    lo = start
    for hi in (min(k_max, max(start + 1, math.ceil(start * step))), k_max):  # one step up, then the top
        if hi <= lo:
            break
        goal_ok, ok = probe(hi)
        if not _short(goal_ok, ok):
            return _bisect(probe, lo, hi, goal_ok and ok, min_k, tolerance)
        lo = hi
    return _Answer(lo, False)


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
    :func:`search_minimal` can bisect over its prefixes. ``score_kwargs`` go to :func:`score`
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
