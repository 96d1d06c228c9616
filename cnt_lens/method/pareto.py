"""The Pareto search: points of (k, alpha) proposed by Optuna against three objectives at once.

:func:`~cnt_lens.method.search.search_minimal` bisects k at each alpha of a fixed grid for the smallest set
reaching the goal. :func:`search_pareto` instead lets a multi-objective sampler (Optuna's Gaussian-process
sampler, with reaching the goal within the run's constraint as its feasibility) propose ``trials`` points over k
(log scale) and a continuous alpha, scoring each on three objectives: the share of the donor–target gap closed
(up), the first-token KL from the target on the harmless validation inputs (down) and the share of neurons written
(down). Every point is measured as a bisection's is (:func:`~cnt_lens.method.search.measure_point`: estimated
when the search screens, evaluated otherwise), so both searches can be set side by side at the same number of
points. The result is the same
:class:`~cnt_lens.method.search.SearchResult`: ``frontier`` holds every point, :func:`pareto_front` picks its
non-dominated ones, and the chosen point is the fewest neurons on the front that reaches the goal acceptably
(within ``max_kl`` and the constraint), confirmed by a full evaluation.

Optuna (a well-kept, widely used optimiser; heretic searches its ablation weights with it) and SciPy (its
Gaussian-process sampler's optimiser) are the ``search`` extra: ``pip install 'cnt_lens[search]'``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import replace
from typing import Any, Callable, Iterator, Sequence, TypeVar

from cnt_lens.behaviours.base import Behaviour
from cnt_lens.behaviours.constraints import Constraint
from cnt_lens.core.errors import CntLensError
from cnt_lens.core.progress import progress_bar
from cnt_lens.core.records import Point, Reference
from cnt_lens.method.config import SearchConfig
from cnt_lens.method.divergence import KL_NAME
from cnt_lens.method.search import SearchResult, largest_k, measure_point, screened_reference, top_set
from cnt_lens.method.selection import NeuronScores
from cnt_lens.models.pair import ModelPair

__all__ = ["nondominated", "objectives", "pareto_front", "search_pareto", "violation"]

T = TypeVar("T")


def _optuna() -> Any:
    """The optuna module, or an error that says how to install it."""
    try:
        import optuna
        import scipy  # noqa: F401  (the Gaussian-process sampler's optimiser, imported only once it samples)
    except ImportError:
        raise CntLensError("search strategy 'pareto' needs Optuna and SciPy: pip install 'cnt_lens[search]' (bash "
                           "scripts/setup installs it), or use the bisection search (SearchConfig.strategy="
                           "'bisection')") from None
    return optuna


def objectives(point: Point) -> tuple[float, ...]:
    """``point``'s objectives, each to be minimised: gap not closed (from 1), first-token KL when read, neurons."""
    kl = point.numbers.get(KL_NAME)
    gap = 1.0 - min(point.gap_closed, 1.0) if math.isfinite(point.gap_closed) else 1.0
    return (gap, *(() if kl is None else (float(kl),)), point.fraction)


def violation(point: Point, goal: float) -> float:
    """How far ``point`` is from an answer (0: acceptable and at ``goal``): the sampler's constraint.

    The share of the gap still short of ``goal``, plus 1 when the point breaks the constraint or the KL bound: the
    sampler looks for small, low-KL sets among those that reach the goal, and the front keeps every acceptable point.
    """
    short = max(0.0, goal - point.gap_closed) if math.isfinite(point.gap_closed) else goal
    return short + (0.0 if point.acceptable else 1.0)


def nondominated(items: Sequence[T], key: Callable[[T], tuple[float, ...]]) -> list[T]:
    """The ``items`` no other item dominates (as good on every objective of ``key``, each minimised, and better on one).

    In their input order; items with equal objectives are all kept.

    Example:
        >>> nondominated([(1, 5), (2, 2), (3, 3), (1, 5)], key=lambda p: p)
        [(1, 5), (2, 2), (1, 5)]
    """
    keys = [key(x) for x in items]

    def dominated(o: tuple[float, ...]) -> bool:
        return any(all(a <= b for a, b in zip(q, o)) and q != o for q in keys)

    return [x for x, o in zip(items, keys) if not dominated(o)]


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The acceptable ``points`` no other acceptable point beats on every objective (:func:`objectives`), by k.

    Example:
        >>> p = lambda k, gap: Point("m", k, k / 100, 2.0, gap, gap >= 0.9, True, "estimate", {})
        >>> [q.k for q in pareto_front([p(5, 0.5), p(10, 0.4), p(20, 0.95)])]
        [5, 20]
    """
    front = {(p.k, p.alpha, p.measured): p for p in nondominated([p for p in points if p.acceptable], objectives)}
    return sorted(front.values(), key=lambda p: (p.k, objectives(p)))


def search_pareto(
    pair: ModelPair,
    behaviour: Behaviour,
    scores: NeuronScores,
    config: SearchConfig = SearchConfig(strategy="pareto"),
    *,
    side_effects: Sequence[Behaviour] = (),
    constraint: Constraint | None = None,
    reference: Reference | None = None,
    progress: bool = True,
) -> SearchResult:
    """``config.trials`` points of ``scores``' top-k sets proposed by Optuna; the fewest neurons reaching the goal.

    k is drawn on a log scale in ``[min_k, max_fraction × neurons]``, alpha on a log scale between the smallest
    and the largest of ``config.alphas`` (fixed when they are equal); the first trials are the largest set at each
    alpha of the grid. A point is feasible for the sampler when it reaches the goal and keeps ``constraint`` and
    ``max_kl`` (:func:`violation`; see :func:`~cnt_lens.method.search.measure_point`). When the search
    screens (``config.screen``, as in :func:`~cnt_lens.method.search.search_minimal`), trials are estimated,
    count as reaching the goal within ``slack`` of it, and at most ``config.confirm`` of them — the
    goal-reaching acceptable ones, fewest neurons first — are evaluated in full; the first the evaluation
    confirms is the answer. When none is confirmed or none reached it, the acceptable trial closing the most
    of the gap is evaluated in full, the answer only if that evaluation reaches the goal (else ``found`` is
    ``False`` and the caller keeps the best evaluated point).
    Settings are ``config``'s (:class:`~cnt_lens.method.config.SearchConfig`); ``reference`` as in
    :func:`~cnt_lens.method.search.search_minimal`.
    """
    optuna = _optuna()
    c = config
    k_max = largest_k(c, pair.n_neurons)
    behaviours = [behaviour, *side_effects]
    reference = screened_reference(pair, behaviour, side_effects, c, reference)
    estimated = reference.estimate
    trial_reference, trial_config = (estimated, replace(c, goal=c.goal - c.slack)) if estimated else (reference, c)
    frontier: list[Point] = []
    bar = progress_bar(desc="search_pareto", unit="point", total=c.trials, enabled=progress)

    def measure(k: int, alpha: float, ref: Reference, cfg: SearchConfig) -> Point:
        point = measure_point(pair, behaviours, scores, top_set(scores, k, c, pair.n_layers), alpha, ref, cfg,
                              constraint)
        frontier.append(point)
        bar.update(1)
        bar.set_postfix(k=point.k, alpha=f"{alpha:.3g}", closed=f"{point.gap_closed:.2f}", by=point.measured)
        return point

    trials: dict[tuple[int, float], Point] = {}
    with _quiet(optuna):
        study = _study(optuna, c, reference.kl is not None, k_max)
        for _ in range(c.trials):
            trial = study.ask()
            k, alpha = _suggest(trial, c, k_max)
            point = trials.get((k, alpha)) or measure(k, alpha, trial_reference, trial_config)
            trials[(k, alpha)] = point
            trial.set_user_attr("violation", violation(point, trial_config.goal))
            study.tell(trial, objectives(point))
    if estimated:
        best = _confirm(list(trials.values()), lambda p: measure(p.k, p.alpha, reference, c), c.confirm)
    else:
        best = min((p for p in trials.values() if p.reached), key=lambda p: (p.k, objectives(p)), default=None)
    bar.close()
    if best is None or not best.reached:
        return SearchResult(None, None, None, frontier, reference)
    return SearchResult(top_set(scores, best.k, c, pair.n_layers), best.alpha,
                        {key: v for key, v in best.items() if isinstance(v, float)}, frontier, reference)


@contextlib.contextmanager
def _quiet(optuna: Any) -> Iterator[None]:
    """Optuna's own log at ERROR inside the block (its per-trial lines, a note on an optional package), then as it was."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def _study(optuna: Any, config: SearchConfig, with_kl: bool, k_max: int) -> Any:
    """A seeded multi-objective Gaussian-process study (:func:`violation` its constraint) opening on the largest sets.

    The first trials are the largest set at each alpha of ``config.alphas``, largest first (which alphas can reach
    the goal at all: what a bisection learns first); the sampler proposes every trial after them. A Gaussian
    process (expected hypervolume improvement; feasibility modelled beside it) rather than TPE: over two smooth
    parameters and a few dozen points at most, it needs the fewest points to find the feasible region.
    """
    opening = sorted(set(config.alphas), reverse=True)[:config.trials]
    with warnings.catch_warnings():  # constraints_func is marked experimental
        warnings.simplefilter("ignore")
        sampler = optuna.samplers.GPSampler(seed=config.seed, n_startup_trials=len(opening),
                                            deterministic_objective=True,
                                            constraints_func=lambda t: (t.user_attrs.get("violation", 1.0),))
    study = optuna.create_study(directions=["minimize"] * (3 if with_kl else 2), sampler=sampler)
    for alpha in opening:
        study.enqueue_trial({"k": k_max, "alpha": alpha}, skip_if_exists=True)
    return study


def _suggest(trial: Any, config: SearchConfig, k_max: int) -> tuple[int, float]:
    """One trial's (k, alpha): k log-uniform over the budget, alpha log-uniform over ``alphas``' range (3 digits)."""
    k = trial.suggest_int("k", config.min_k, k_max, log=True)
    lo, hi = min(config.alphas), max(config.alphas)
    alpha = lo if lo == hi else trial.suggest_float("alpha", lo, hi, log=True)
    return k, float(f"{alpha:.3g}")


def _confirm(points: list[Point], evaluate: Callable[[Point], Point], confirm: int) -> Point | None:
    """Evaluate in full up to ``confirm`` goal-reaching acceptable estimates, fewest neurons first; the first confirmed.

    A candidate no larger and no stronger than one the evaluation already refuted (k and alpha both ≤) is
    skipped: the gap grows with both. When no candidate is confirmed, the acceptable estimate closing the most of
    the gap is evaluated (unless already), so the search ends with an evaluated point whenever one was acceptable.
    """
    refuted: list[Point] = []
    for point in sorted((p for p in points if p.reached), key=lambda p: (p.k, objectives(p))):
        if len(refuted) == confirm:
            break
        if any(point.k <= r.k and point.alpha <= r.alpha for r in refuted):
            continue
        full = evaluate(point)
        if full.reached:
            return full
        refuted.append(full)
    acceptable = [p for p in points if p.acceptable] or points
    closest = max(acceptable, key=lambda p: p.gap_closed if math.isfinite(p.gap_closed) else -math.inf)
    if any(p.k == closest.k and p.alpha == closest.alpha for p in refuted):
        return None
    return evaluate(closest)
