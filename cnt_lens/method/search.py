"""Minimal transplant search: the fewest neurons (and the scale) that reach a behavioural goal.

Every candidate is *verified*: its patch is applied to the target, the behaviour is evaluated on
a held-out split (validation by default, never the split the scores came from), and the patch is
reverted. The goal is a fraction of the donor–target gap in the behaviour's headline number::

    closed = (patched − target) / (donor − target)  ≥  goal

which reads the same for function addition (gap > 0) and deletion (gap < 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, NamedTuple, Sequence

from cnt_lens.behaviours.base import Behaviour
from cnt_lens.behaviours.constraints import Constraint
from cnt_lens.core.errors import CntLensError
from cnt_lens.core.moved import moved_name
from cnt_lens.core.progress import progress_bar
from cnt_lens.core.records import Point, Reference
from cnt_lens.core.timing import stage
from cnt_lens.method.config import SearchConfig
from cnt_lens.method.divergence import KL_NAME, KLReference, watching
from cnt_lens.method.evaluate import measure
from cnt_lens.method.selection import NeuronScores, NeuronSelection
from cnt_lens.method.transplant import NeuronPatch
from cnt_lens.models.pair import ModelPair

__all__ = ["NoGapError", "SearchResult", "check_kl_bound", "largest_k", "measure_point", "measure_reference",
           "screened_reference", "search_minimal", "top_set"]



def __getattr__(name: str) -> object:
    """Names that moved to another module (``iterative_scores``, ``next_overlap``: :mod:`cnt_lens.method.rounds`)."""
    return moved_name(__name__, name)


class NoGapError(CntLensError, ValueError):
    """Donor and target do not differ on the behaviour: there is nothing to transplant."""


def measure_reference(pair: ModelPair, behaviour: Behaviour, side_effects: Sequence[Behaviour] = (), *,
                      split: str = "validation", batch_size: int = 16, estimate: bool = False) -> Reference:
    """The donor's and the target's numbers on ``split``, as a :class:`~cnt_lens.core.records.Reference`.

    Raises :class:`NoGapError` when they agree on ``behaviour.headline``: no transplant can close a gap
    that is not there. Run it before any long stage; it costs one evaluation of each model
    (``estimate``: each behaviour's cheap estimate, see :func:`~cnt_lens.method.evaluate.measure`).
    When the behaviour has KL inputs on ``split`` (:meth:`~cnt_lens.Behaviour.kl_batches`) and this is an
    evaluation, the reference also holds the target's next-token log-probabilities on them (``kl``), and
    both blocks their first-token KL from the target: every point measured against it reads its own.
    """
    kw = dict(batch_size=batch_size, estimate=estimate)
    batches = [] if estimate else behaviour.kl_batches(pair.tokenizer, split, batch_size)
    with watching(batches) as seen_target:
        target = measure(pair.target, [behaviour, *side_effects], split, **kw)
    with watching(batches) as seen_donor:
        donor = measure(pair.donor, [behaviour, *side_effects], split, **kw)
    reference = Reference(donor=donor, target=target, split=split, measured="estimate" if estimate else "evaluation")
    head = behaviour.headline
    d, t = reference["donor"][head], reference["target"][head]
    if d == t or math.isnan(d - t):
        raise NoGapError(
            f"donor and target have the same {head} on {split}{' (estimated)' if estimate else ''} (donor {d}, "
            f"target {t}); no gap to close. Likely causes: the donor is not the model you meant (a cached "
            "fine-tune that did not take, a checkpoint of the target itself), the prompt set does not elicit the "
            "behaviour, or generation is broken (install the pinned set: bash scripts/setup)."
        )
    if not batches:
        return reference
    with stage("first-token KL reference"):
        kl = KLReference.of_model(pair.target, batches, seen_target)
        return replace(reference, kl=kl, donor={**reference.donor, **kl.of(pair.donor, seen_donor)},
                       target={**reference.target, **kl.unedited()})


def measure_point(pair: ModelPair, behaviours: Sequence[Behaviour], scores: NeuronScores, selection: NeuronSelection,
                  alpha: float, reference: Reference, config: SearchConfig = SearchConfig(),
                  constraint: Constraint | None = None) -> Point:
    """One frontier point: ``selection`` of ``scores`` applied at ``alpha``, measured, then reverted.

    ``behaviours[0]`` is the transplanted behaviour (its headline defines ``gap_closed`` against
    ``reference``), the rest side effects. The point is measured as ``reference`` was: on its split,
    estimated when it holds estimates, with its first-token KL when ``reference.kl`` holds the inputs
    (exact either way: one forward pass, or none where the evaluation generated from those inputs,
    :func:`~cnt_lens.method.divergence.watching`). ``config`` gives the goal, the batch size and ``max_kl``;
    ``acceptable`` says whether ``constraint`` holds and the KL is within ``max_kl``.
    """
    check_kl_bound(config, reference)
    head = behaviours[0].headline
    estimate = reference.measured == "estimate"
    with NeuronPatch.from_pair(pair, selection, alpha).applied(pair.target):
        with watching(reference.kl) as seen:  # a generation from the KL's inputs gives their distributions
            m = measure(pair.target, behaviours, reference.split, batch_size=config.batch_size, estimate=estimate)
        if reference.kl is not None:
            with stage("first-token KL"):
                m.update(reference.kl.of(pair.target, seen))
    closed = (m[head] - reference.target[head]) / (reference.donor[head] - reference.target[head])
    within = config.max_kl is None or bool(m[KL_NAME] <= config.max_kl)
    ok = (constraint is None or bool(constraint(m, reference))) and within
    return Point(scores.method, k=selection.n, fraction=selection.n / pair.n_neurons, alpha=alpha,
                 gap_closed=closed, goal_reached=bool(closed >= config.goal), acceptable=ok,
                 measured=reference.measured, numbers=m)


def check_kl_bound(config: SearchConfig, reference: Reference) -> None:
    """Raise, before any point is measured, when ``config.max_kl`` bounds a KL that ``reference`` cannot read."""
    if config.max_kl is not None and reference.kl is None:
        raise CntLensError(f"search.max_kl={config.max_kl} bounds the first-token KL, but this search measures none: "
                           "the behaviour has no KL inputs on the search's split (Behaviour.kl_batches) or the "
                           "reference was built without them (measure_reference builds them); drop max_kl or give "
                           "the behaviour harmless prompts")


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
    k_max = largest_k(c, pair.n_neurons)
    behaviours = [behaviour, *side_effects]
    reference = screened_reference(pair, behaviour, side_effects, c, reference)
    estimated = reference.estimate
    estimate_config = replace(c, goal=c.goal - c.slack) if estimated else c
    frontier: list[Point] = []
    bar = progress_bar(desc="search_minimal", unit="point", enabled=progress)

    def select(k: int) -> NeuronSelection:
        return top_set(scores, k, c, pair.n_layers)

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


def top_set(scores: NeuronScores, k: int, config: SearchConfig, n_layers: int) -> NeuronSelection:
    """The search's set of size ``k``: the top ``k`` of ``scores`` (``config.per_layer``: ``k // n_layers`` a layer)."""
    return scores.top_k(max(1, k // n_layers), per_layer=True) if config.per_layer else scores.top_k(k)


def screened_reference(pair: ModelPair, behaviour: Behaviour, side_effects: Sequence[Behaviour],
                       config: SearchConfig, reference: Reference | None = None) -> Reference:
    """The reference a search measures against: ``reference`` (measured when ``None``) with its cheap estimates.

    ``estimate`` is set when ``config.screen`` and some behaviour's estimate is not its evaluation, and the
    estimates show a gap (``None`` otherwise: the search then evaluates every point in full); estimates
    already held are kept. The estimates read the reference's first-token KL, which is exact either way.
    """
    if reference is None:
        reference = measure_reference(pair, behaviour, side_effects, split=config.split, batch_size=config.batch_size)
    behaviours = [behaviour, *side_effects]
    screen = config.screen and not all(b.estimate_is_evaluation for b in behaviours)  # else the estimate *is* it
    estimated = (reference.estimate or _estimated_reference(pair, behaviour, side_effects, config)) if screen else None
    return replace(reference, estimate=_with_kl(estimated, reference))


def _with_kl(estimated: Reference | None, reference: Reference) -> Reference | None:
    """``estimated`` reading ``reference``'s first-token KL: the KL is exact, so estimated points read the same one."""
    if estimated is None or reference.kl is None:
        return estimated
    kl = {role: {key: v for key, v in reference[role].items() if key.startswith(KL_NAME)} for role in reference}
    return replace(estimated, kl=reference.kl, donor={**estimated.donor, **kl["donor"]},
                   target={**estimated.target, **kl["target"]})


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


def largest_k(config: SearchConfig, total: int) -> int:
    """The largest k a search of ``total`` neurons tries; checks what :class:`SearchConfig` cannot alone (no model)."""
    goal, max_fraction, min_k, slack = config.goal, config.max_fraction, config.min_k, config.slack
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
