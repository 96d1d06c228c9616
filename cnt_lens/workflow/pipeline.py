"""One transfer, computed: score → minimal search → baselines at the same budget → test evaluation.

:func:`transfer` is what ``cnt-lens demo`` (and every application) runs. Splits are kept apart:
scores come from **train**, the minimal set and every alpha are chosen on **validation**, and the
numbers reported are measured on **test**, which nothing before has seen.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from cnt_lens.behaviours.base import Behaviour
from cnt_lens.behaviours.constraints import Constraint
from cnt_lens.core.records import Block, Point, Reference
from cnt_lens.core.stats import is_companion
from cnt_lens.core.timing import stage
from cnt_lens.data.tokens import Batch
from cnt_lens.method.config import TransferConfig
from cnt_lens.method.divergence import KLReference, watching
from cnt_lens.method.evaluate import Report, measure
from cnt_lens.method.pareto import search_pareto
from cnt_lens.method.rounds import iterative_scores
from cnt_lens.method.scoring import SCORERS, score
from cnt_lens.method.search import SearchResult, check_kl_bound, measure_point, measure_reference, search_minimal
from cnt_lens.method.selection import NeuronScores
from cnt_lens.method.transplant import NeuronPatch
from cnt_lens.models.forward import Model
from cnt_lens.models.pair import ModelPair

__all__ = ["TransferResult", "transfer"]


log = logging.getLogger(__name__)


def _log(msg: str) -> None:
    log.info(msg)


def rank_key(point: Mapping[str, Any], reference: Mapping[str, Block],
             behaviour: Behaviour) -> tuple[float, float]:
    """Order validation points: share of the headline gap closed, then of ``behaviour.tiebreak``'s gap.

    A thresholded headline (the share of pairs that prefer the stereotype) ties many points at the same
    value; the tie-break prefers the one that moved the continuous number furthest toward the donor.
    """
    second = 0.0
    tb = behaviour.tiebreak
    donor, target = reference["donor"], reference["target"]
    if tb and tb in point and tb in donor and tb in target:
        gap = donor[tb] - target[tb]
        if gap:
            second = (point[tb] - target[tb]) / gap
    return point["gap_closed"], second


def best_point(points: Sequence[Point], reference: Reference, behaviour: Behaviour) -> Point:
    """The best acceptable point of ``points`` by :func:`rank_key` (the best of all when none is acceptable).

    Each point is ranked against what it was measured with: an estimated point against
    ``reference.estimate``, an evaluated one against ``reference``.
    """
    def key(point: Point) -> tuple[float, float]:
        estimated = point.measured == "estimate" and reference.estimate is not None
        return rank_key(point, reference.estimate if estimated else reference, behaviour)

    return max([p for p in points if p.acceptable] or points, key=key)


def minimal_summary(result: SearchResult, n_neurons: int, max_fraction: float) -> dict[str, Any]:
    """What ``minimal_sets`` records of one method's search: found, k, fraction, alpha, max_fraction."""
    k = result.selection.n if result.selection is not None else None
    return {"found": result.found, "k": k, "fraction": None if k is None else k / n_neurons,
            "alpha": result.alpha, "max_fraction": max_fraction}


@dataclass(frozen=True)
class TransferResult:
    """What :func:`transfer` computed; :func:`~cnt_lens.workflow.runs.run_transfer` writes it as a run directory.

    ``blocks``: each model's test numbers (``target``, ``donor``, ``patched``, then each baseline by
    method); ``frontier``: every validation point measured, main method first; ``items``: one record per
    test prompt of target, donor and patched (response and verdict); ``reference``: donor and target on
    validation (with their estimates when the search screened); ``minimal_sets``: each method's own
    search answer (``found``, ``k``, ``fraction``, ``alpha``, ``max_fraction``).
    """

    config: TransferConfig
    behaviour: str
    n_neurons_total: int
    blocks: Mapping[str, Block]
    patch: NeuronPatch
    scores: Mapping[str, NeuronScores]
    frontier: tuple[Point, ...]
    items: Mapping[str, list[dict[str, Any]]]
    reference: Reference
    minimal_sets: Mapping[str, dict[str, Any]]
    goal_reached: bool
    wall_time_s: float

    @property
    def report(self) -> Report:
        """The numbers as :class:`~cnt_lens.method.evaluate.Report` (``metrics.json``'s layout; ``extra`` from the fields)."""
        main = self.patch.meta["method"]
        estimates = self.reference.estimate
        return Report(
            behaviour=self.behaviour, split="test", n_neurons_total=self.n_neurons_total,
            donor=self.blocks["donor"], target=self.blocks["target"],
            patched={**self.blocks[main], "goal_reached_on_validation": self.goal_reached},
            baselines=[self.blocks[m] for m in self.config.baselines.methods],
            frontier=[p.to_dict() for p in self.frontier],
            extra={"config": self.config.to_dict(), "validation_reference": self.reference.to_dict(),
                   "validation_estimates": {} if estimates is None else estimates.to_dict(),
                   "minimal_sets": dict(self.minimal_sets), "wall_time_s": self.wall_time_s})


@dataclass
class _Run:
    """The state the stages of :func:`transfer` share."""

    pair: ModelPair
    behaviour: Behaviour
    side_effects: Sequence[Behaviour]
    constraint: Constraint | None
    cfg: TransferConfig
    reference: Reference  # donor and target on validation; ``.estimate``: their cheap estimates, once measured
    progress: bool
    kl: KLReference | None = None  # test inputs of the first-token KL and the unedited target's log-probs

    @property
    def estimated(self) -> Reference | None:
        """Donor's and target's estimates on validation (``None`` until a screened search measured them)."""
        return self.reference.estimate

    def evaluate(self, model: Model, items: list[dict[str, Any]] | None = None, *,
                 unedited: list[Batch] | None = None) -> Block:
        """``model``'s test numbers on the behaviour and the side effects, and its first-token KL from the target.

        ``unedited``: ``model`` is the unedited target and these are the KL's inputs: its evaluation also
        builds the KL reference (``self.kl``) from what its generations computed, and its own KL is 0.
        """
        watched = unedited if unedited is not None else self.kl
        with watching(watched) as seen:  # the KL reads what the evaluation's generations already computed
            block = measure(model, [self.behaviour, *self.side_effects], "test",
                            batch_size=self.cfg.evaluation.batch_size, items=items)
        if unedited is not None:
            with stage("first-token KL reference"):
                self.kl = KLReference.of_model(model, unedited, seen) if unedited else None
        if self.kl is None:
            return block
        with stage("first-token KL"):
            return {**block, **(self.kl.unedited() if unedited is not None else self.kl.of(model, seen))}

    def search(self, scores: NeuronScores) -> SearchResult:
        """The search of ``scores`` with this run's settings (it keeps the estimates).

        :func:`~cnt_lens.method.search.search_minimal`, or :func:`~cnt_lens.method.pareto.search_pareto` when
        ``cfg.search.strategy`` is ``"pareto"``.
        """
        strategy = search_pareto if self.cfg.search.strategy == "pareto" else search_minimal
        result = strategy(self.pair, self.behaviour, scores, self.cfg.search, side_effects=self.side_effects,
                          constraint=self.constraint, reference=self.reference, progress=self.progress)
        if result.reference is not None and result.reference.estimate is not None:
            self.reference = result.reference
        return result


def _main_ranking(run: _Run) -> NeuronScores | None:
    """Stage 1a, train: the main ranking when ``cfg.ranking`` asks for more than one plain pass, else ``None``.

    ``rounds > 0``: :func:`~cnt_lens.method.rounds.iterative_scores` up to the search's budget; otherwise one
    pass with the contrast and preserved side effects when the method takes them (a method without
    them, e.g. a baseline as main method, is scored plainly by :func:`_score_all`).
    """
    ranking, side_effects = run.cfg.ranking, run.side_effects
    weights = ranking.preserve_weights if ranking.preserve_weights is not None else (10.0,) * len(side_effects)
    if len(weights) != len(side_effects):
        raise ValueError(f"{len(weights)} preserve weights for {len(side_effects)} side effects "
                         "(RankingConfig.preserve_weights: one per side effect)")
    kept = [(b, w) for b, w in zip(side_effects, weights) if w]
    penalties = {"contrast": ranking.contrast, "preserve": [b for b, _ in kept],
                 "preserve_weight": [w for _, w in kept]}
    if ranking.rounds > 0:
        with stage(f"score {ranking.method}, {ranking.rounds} rounds"):
            return iterative_scores(run.pair, run.behaviour, budget=run.cfg.search.max_fraction, rounds=ranking.rounds,
                                    alpha=ranking.round_alpha, method=ranking.method, stop_overlap=ranking.stop_overlap,
                                    batch_size=ranking.batch_size, progress=run.progress, **penalties)
    if (ranking.contrast or kept) and set(penalties) <= set(SCORERS[ranking.method].options):
        with stage(f"score {ranking.method}"):
            return score(run.pair, run.behaviour, ranking.method, split="train", batch_size=ranking.batch_size,
                         positions=ranking.positions, progress=run.progress, **penalties)
    return None


def _score_all(run: _Run, scores: NeuronScores | None) -> tuple[str, dict[str, NeuronScores]]:
    """Stage 1, train: the main ranking (``scores``, or ``cfg.ranking``'s) and every baseline's scores."""
    ranking, all_scores = run.cfg.ranking, {}
    scores = scores if scores is not None else _main_ranking(run)
    if scores is None:
        main, to_score = ranking.method, [ranking.method, *run.cfg.baselines.methods]
    else:
        main, to_score = scores.method, list(run.cfg.baselines.methods)
        all_scores[main] = scores
    for method in to_score:
        _log(f"scoring: {method}")
        options = SCORERS[method].options
        kwargs = {**({"utility": run.side_effects[0]} if "utility" in options and run.side_effects else {}),
                  **({"seed": ranking.seed} if "seed" in options else {})}
        with stage(f"score {method}"):
            all_scores[method] = score(run.pair, run.behaviour, method, split="train", batch_size=ranking.batch_size,
                                       positions=ranking.positions, progress=run.progress, **kwargs)
    return main, all_scores


def _choose_point(run: _Run, main: NeuronScores) -> tuple[SearchResult, int, float, bool]:
    """Stage 2, validation: the minimal set, or the best acceptable point when the goal is out of reach.

    Returns the search result, k, alpha, and whether that point met the constraint on validation.
    """
    search = run.cfg.search
    _log(f"{'search_pareto, ' + str(search.trials) + ' trials,' if search.strategy == 'pareto' else 'search_minimal'} "
         f"over alphas {list(search.alphas)} up to {search.max_fraction:.1%} of neurons")
    with stage("search (validation)"):
        result = run.search(main)
    if result.found:
        k, alpha = result.selection.n, result.alpha
        _log(f"minimal set: {k} neurons ({k / run.pair.n_neurons:.2%}), alpha {alpha}")
        return result, k, alpha, True
    best = _best_evaluated(run, main, result.frontier)
    k, alpha, ok = best.k, best.alpha, best.acceptable
    _log(f"goal not reached within {search.max_fraction:.1%}; " + ("best acceptable point" if ok else
         "no point met the constraint, the best of them") + f": {k} neurons, alpha {alpha}")
    return result, k, alpha, ok


def _best_evaluated(run: _Run, scores: NeuronScores, points: list[Point]) -> Point:
    """The best acceptable point evaluated in full.

    When only estimates exist, each alpha's best estimated point is evaluated (and appended to
    ``points``) and the best of those is returned: estimates rank points, evaluations choose.
    """
    evaluated = [p for p in points if p.measured != "estimate"]
    if not evaluated:
        behaviours = [run.behaviour, *run.side_effects]
        for alpha in dict.fromkeys(p.alpha for p in points):
            guess = best_point([p for p in points if p.alpha == alpha], run.reference, run.behaviour)
            evaluated.append(measure_point(run.pair, behaviours, scores, scores.top_k(guess.k), alpha, run.reference,
                                           run.cfg.search, run.constraint))
        points += evaluated
    return best_point(evaluated, run.reference, run.behaviour)


def _baseline_alpha(run: _Run, scores: NeuronScores, k: int) -> tuple[float, bool, list[Point]]:
    """Stage 3, validation: a baseline's alpha at the main method's k (the same alpha grid and rule).

    With estimates (a screened search) every alpha is estimated and only the best one evaluated in full.
    Returns the alpha, whether it met the constraint in full evaluation, and the points measured.
    """
    behaviours, selection = [run.behaviour, *run.side_effects], scores.top_k(k)
    reference = run.estimated if run.estimated is not None else run.reference
    points = [measure_point(run.pair, behaviours, scores, selection, a, reference, run.cfg.search, run.constraint)
              for a in run.cfg.search.alphas]
    chosen = best_point(points, run.reference, run.behaviour)
    if run.estimated is not None:
        chosen = measure_point(run.pair, behaviours, scores, selection, chosen.alpha, run.reference, run.cfg.search,
                               run.constraint)
        points.append(chosen)
    return chosen.alpha, chosen.acceptable, points


def _evaluate_test(run: _Run, main: str, all_scores: dict[str, NeuronScores], k: int, chosen: dict[str, float],
                   acceptable: dict[str, bool]) -> tuple[dict[str, Block], NeuronPatch, dict[str, list]]:
    """Stage 4, test (read once): target, donor, the patched target and every baseline at its chosen alpha."""
    _log("test-split evaluation")
    kl_inputs = run.behaviour.kl_batches(run.pair.tokenizer, "test", run.cfg.evaluation.batch_size)
    items: dict[str, list[dict[str, Any]]] = {"target": [], "donor": [], "patched": []}
    blocks: dict[str, Block] = {}
    for name in ("target", "donor"):  # the target first: its evaluation builds the KL reference
        with stage(name):
            blocks[name] = run.evaluate(getattr(run.pair, name), items[name],
                                        unedited=kl_inputs if name == "target" else None)
    main_patch = None
    for method, a in chosen.items():
        patch = NeuronPatch.from_pair(run.pair, all_scores[method].top_k(k), a, scores=all_scores[method],
                                      meta={"method": method, "behaviour": run.behaviour.name})
        with stage(method), patch.applied(run.pair.target):
            blocks[method] = {"method": method, "n_neurons": k, "alpha": a,
                              "acceptable_on_validation": acceptable[method],
                              **run.evaluate(run.pair.target, items["patched"] if method == main else None)}
        if method == main:
            main_patch = patch
        if method == "random" and run.cfg.baselines.random_seeds > 1:
            with stage("random, more seeds"):
                blocks[method].update(_random_seeds(run, k, a, blocks[method]))
    assert main_patch is not None
    return blocks, main_patch, items


def _random_seeds(run: _Run, k: int, alpha: float, first: Block) -> dict[str, Any]:
    """The random baseline's spread on test: ``random_seeds`` seeds at the same k and alpha.

    Returns ``seeds`` (each seed's numbers) and, per number, ``{name}_seed_mean`` and ``{name}_seed_sd``.
    """
    seed0 = run.cfg.ranking.seed
    numbers = [n for n, v in first.items() if isinstance(v, float) and not is_companion(n) and n != "alpha"]
    per_seed = [{"seed": seed0, **{n: first[n] for n in numbers}}]
    for seed in range(seed0 + 1, seed0 + run.cfg.baselines.random_seeds):
        ranking = score(run.pair, run.behaviour, "random", seed=seed, progress=False)
        with NeuronPatch.from_pair(run.pair, ranking.top_k(k), alpha).applied(run.pair.target):
            block = run.evaluate(run.pair.target)
        per_seed.append({"seed": seed, **{n: block[n] for n in numbers}})
    out: dict[str, Any] = {"seeds": per_seed}
    for n in numbers:
        vals = [s[n] for s in per_seed]
        out[f"{n}_seed_mean"], out[f"{n}_seed_sd"] = statistics.mean(vals), statistics.stdev(vals)
    return out


def _baselines(run: _Run, all_scores: dict[str, NeuronScores], k: int, frontier: list[Point],
               found: tuple[dict[str, float], dict[str, bool], dict[str, dict[str, Any]]]) -> None:
    """Stage 3, validation: each baseline's alpha at ``k`` and (``baselines.search``) its own minimal set.

    Adds to ``frontier`` and to ``found`` (chosen alpha, acceptable, minimal set; each by method).
    """
    chosen, acceptable, minimal = found
    for method in run.cfg.baselines.methods:
        _log(f"baseline {method}: alpha search at k={k}")
        with stage(f"baseline {method} (validation)"):
            chosen[method], acceptable[method], points = _baseline_alpha(run, all_scores[method], k)
            frontier += points
            if run.cfg.baselines.search:
                result = run.search(all_scores[method])
                minimal[method] = minimal_summary(result, run.pair.n_neurons, run.cfg.search.max_fraction)
                frontier += result.frontier


def transfer(
    pair: ModelPair,
    behaviour: Behaviour,
    config: TransferConfig = TransferConfig(),
    *,
    side_effects: Sequence[Behaviour] = (),
    constraint: Constraint | None = None,
    scores: NeuronScores | None = None,
    reference: Reference | None = None,
    progress: bool = True,
) -> TransferResult:
    """Find the minimal transplant of ``behaviour`` from donor to target and compare it with baselines.

    ``constraint(point, reference)`` gets a validation point's numbers and the donor's and
    target's (``reference.donor``, ``reference.target``) and says whether it is acceptable
    (e.g. harmless refusal no higher than the donor's). Baselines get the same neuron budget as the
    found patch and the same alpha choice on validation, and (``config.baselines.search``) the main
    method's whole search for their own minimal set. With ``config.search.screen``, search points are
    decided by cheap estimates and only the points that matter are evaluated in full
    (:func:`~cnt_lens.method.search.search_minimal`); every number reported is a full evaluation. ``scores``
    (e.g. from :func:`~cnt_lens.method.rounds.iterative_scores`) replaces ``config.ranking`` for the main
    ranking; ``reference`` (donor and target on validation, from
    :func:`~cnt_lens.method.search.measure_reference`) is measured here when not given, and a pair without a
    gap stops there. Computes only: :func:`~cnt_lens.workflow.runs.run_transfer` writes the run directory, and
    inside :func:`~cnt_lens.method.resume.resumable` every evaluation and scoring pass is remembered.

    Stages: score (train) → choose the point (validation) → each baseline's alpha at the same k and
    its own minimal set (validation) → evaluate (test, once).
    """
    t0 = time.time()
    if reference is None:
        _log("donor and target on validation")
        with stage("donor and target (validation)"):
            reference = measure_reference(pair, behaviour, side_effects, split=config.search.split,
                                          batch_size=config.search.batch_size)
    check_kl_bound(config.search, reference)  # before the ranking's long passes
    run = _Run(pair, behaviour, side_effects, constraint, config, reference, progress)
    main, all_scores = _score_all(run, scores)
    result, k, alpha, main_ok = _choose_point(run, all_scores[main])
    frontier = list(result.frontier)
    found = ({main: alpha}, {main: main_ok}, {main: minimal_summary(result, pair.n_neurons, config.search.max_fraction)})
    _baselines(run, all_scores, k, frontier, found)
    with stage("test evaluation"):
        blocks, main_patch, items = _evaluate_test(run, main, all_scores, k, found[0], found[1])
    return TransferResult(config=config, behaviour=behaviour.name, n_neurons_total=pair.n_neurons, blocks=blocks,
                          patch=main_patch, scores=all_scores, frontier=tuple(frontier), items=items,
                          reference=run.reference, minimal_sets=found[2], goal_reached=result.found,
                          wall_time_s=round(time.time() - t0, 1))
