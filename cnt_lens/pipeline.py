"""One transfer, end to end: score → minimal search → baselines at the same budget → test evaluation.

:func:`transfer` is what ``cnt-lens demo`` (and every application) runs. Splits are kept apart:
scores come from **train**, the minimal set and every alpha are chosen on **validation**, and the
numbers reported are measured on **test**, which nothing before has seen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from .behaviours import Behaviour, canary
from .constraints import Constraint
from .evaluate import Report, measure
from .files import atomic_write_text
from .models import ModelPair
from .resume import resumable
from .scoring import SCORERS, score
from .search import SearchResult, measure_point, measure_reference, search_minimal
from .selection import NeuronScores
from .stats import Block, Reference, is_companion
from .timing import stage
from .transplant import NeuronPatch

__all__ = ["TransferConfig", "TransferResult", "transfer"]



@dataclass
class TransferConfig:
    """Settings of :func:`transfer` (all recorded in ``metrics.json``)."""

    method: str = "weight_attribution"
    baselines: Sequence[str] = ("attribution", "activation_contrast", "wanda", "snip", "weight_diff",
                                "nlsr_drift", "random")
    goal: float = 0.9
    alphas: Sequence[float] = (1.0, 2.0, 4.0, 8.0)
    max_fraction: float = 0.05
    #: prompts per generation batch (evaluations, estimates): rows leave a batch as their answers end, so
    #: a wide one keeps the matrix products wide; the answers are each prompt's own (float rounding aside)
    batch_size: int = 128
    #: prompts per scoring batch (one target forward and backward each)
    score_batch_size: int = 16
    positions: Any = "all"
    seed: int = 0
    #: decide search points with cheap estimates and evaluate in full only the points that matter
    #: (:func:`~cnt_lens.search.search_minimal`'s ``screen``); ``False``: every point evaluated in full.
    screen: bool = True
    #: an estimated point counts as reaching the goal within this much of it (gap fraction; ``search_minimal``'s
    #: ``slack``): estimates choose where to evaluate, not the answer.
    screen_slack: float = 0.1
    #: give every baseline the main method's search over k and alpha too (its own minimal set;
    #: ``metrics.json``'s ``extra.minimal_sets``), besides the comparison at the main method's k.
    search_baselines: bool = True
    #: the random baseline is evaluated on test at this many seeds (``seed``, ``seed + 1``, …; same k
    #: and alpha): its block holds the first seed's numbers and ``seeds`` / ``*_seed_mean`` the spread.
    random_seeds: int = 5
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check every setting on construction, so a bad one fails before any model is loaded."""
        if problem := config_problem(self):
            raise ValueError(f"TransferConfig: {problem}")


def config_problem(config: TransferConfig) -> str | None:
    """What is wrong with ``config`` (a sentence naming the field, its value and what it must be), or ``None``."""
    unknown = [m for m in (config.method, *config.baselines) if m not in SCORERS]
    alphas = list(config.alphas)
    checks = [
        (not unknown, f"unknown method(s) {unknown} in method/baselines; one of {list(SCORERS)}"),
        (0 < config.goal <= 1, f"goal {config.goal!r} must be a share of the donor-target gap in (0, 1]"),
        (bool(alphas) and all(isinstance(a, (int, float)) and math.isfinite(a) and a > 0 for a in alphas),
         f"alphas {alphas!r} must be one or more finite numbers > 0 (1 writes the donor's weights)"),
        (0 < config.max_fraction <= 1, f"max_fraction {config.max_fraction!r} must be a share of all MLP neurons "
                                       "in (0, 1]"),
        (config.batch_size >= 1 and config.score_batch_size >= 1,
         f"batch_size {config.batch_size!r} and score_batch_size {config.score_batch_size!r} must be ≥ 1"),
        (config.random_seeds >= 1, f"random_seeds {config.random_seeds!r} must be ≥ 1"),
        (config.screen_slack >= 0, f"screen_slack {config.screen_slack!r} must be ≥ 0"),
    ]
    return next((message for ok, message in checks if not ok), None)


log = logging.getLogger(__name__)


def _log(msg: str) -> None:
    log.info(msg)


def rank_key(point: Block, reference: Reference,
             behaviour: Behaviour) -> tuple[float, float]:
    """Order validation points: share of the headline gap closed, then of ``behaviour.tiebreak``'s gap.

    A thresholded headline (the share of pairs that prefer the stereotype) ties many points at the same
    value; the tie-break prefers the one that moved the continuous number furthest toward the donor.
    """
    second = 0.0
    tb = behaviour.tiebreak
    if tb and tb in point and tb in reference.get("donor", {}) and tb in reference.get("target", {}):
        gap = reference["donor"][tb] - reference["target"][tb]
        if gap:
            second = (point[tb] - reference["target"][tb]) / gap
    return point["gap_closed"], second


class TransferResult(NamedTuple):
    """What :func:`transfer` returns (a tuple, so ``report, patch, scores = transfer(...)`` works)."""

    report: Report
    patch: NeuronPatch | None
    scores: dict[str, NeuronScores]


@dataclass
class _Run:
    """The state the stages of :func:`transfer` share."""

    pair: ModelPair
    behaviour: Behaviour
    side_effects: Sequence[Behaviour]
    constraint: Constraint | None
    cfg: TransferConfig
    reference: Reference
    progress: bool
    estimated: Reference = field(default_factory=dict)  # donor and target, cheap estimates (validation)

    def ref(self, point: Block) -> Reference:
        """The reference ``point`` was measured against: estimates for an estimated point."""
        return self.estimated if point.get("measured") == "estimate" else self.reference

    def ok(self, point: Block) -> bool:
        """Whether the constraint held at ``point`` (as :func:`~cnt_lens.search.measure_point` recorded it)."""
        return point["acceptable"]

    def better(self, point: Block) -> tuple[float, float]:
        return rank_key(point, self.ref(point), self.behaviour)

    def best(self, points: Sequence[Block]) -> Block:
        """The best acceptable point of ``points`` (the best of all when none is acceptable)."""
        return max([p for p in points if self.ok(p)] or points, key=self.better)

    def measure(self, model: Any, split: str, items: list[dict[str, Any]] | None = None) -> Block:
        return measure(model, [self.behaviour, *self.side_effects], split, batch_size=self.cfg.batch_size, items=items)

    def point(self, scores: NeuronScores, k: int, alpha: float, *, estimate: bool) -> dict[str, Any]:
        """A validation point of ``scores``' top ``k`` at ``alpha``, estimated or evaluated in full."""
        return measure_point(self.pair, [self.behaviour, *self.side_effects], scores, scores.top_k(k), alpha,
                             self.estimated if estimate else self.reference, goal=self.cfg.goal,
                             constraint=self.constraint, estimate=estimate, batch_size=self.cfg.batch_size)

    def search(self, scores: NeuronScores) -> SearchResult:
        """:func:`~cnt_lens.search.search_minimal` of ``scores`` with this run's settings."""
        cfg = self.cfg
        return search_minimal(self.pair, self.behaviour, scores, goal=cfg.goal, alphas=cfg.alphas,
                              max_fraction=cfg.max_fraction, side_effects=self.side_effects,
                              constraint=self.constraint, reference=self.reference, screen=cfg.screen,
                              estimated_reference=self.estimated or None, slack=cfg.screen_slack,
                              batch_size=cfg.batch_size, progress=self.progress)


def _score_all(run: _Run, scores: NeuronScores | None) -> tuple[str, dict[str, NeuronScores]]:
    """Stage 1, train split: the main ranking (``scores``, or ``cfg.method``) and every baseline's scores."""
    cfg, all_scores = run.cfg, {}
    if scores is None:
        main, to_score = cfg.method, [cfg.method, *cfg.baselines]
    else:
        main, to_score = scores.method, list(cfg.baselines)
        all_scores[main] = scores
    for method in to_score:
        _log(f"scoring: {method}")
        options = SCORERS[method].options
        kwargs = {**({"utility": run.side_effects[0]} if "utility" in options and run.side_effects else {}),
                  **({"seed": cfg.seed} if "seed" in options else {})}
        with stage(f"score {method}"):
            all_scores[method] = score(run.pair, run.behaviour, method, split="train",
                                       batch_size=cfg.score_batch_size, positions=cfg.positions,
                                       progress=run.progress, **kwargs)
    return main, all_scores


def _choose_point(run: _Run, main: NeuronScores) -> tuple[SearchResult, int, float, bool]:
    """Stage 2, validation: the minimal set, or the best acceptable point when the goal is out of reach.

    Returns the search result, k, alpha, and whether that point met the constraint on validation.
    """
    cfg = run.cfg
    _log(f"search_minimal over alphas {list(cfg.alphas)} up to {cfg.max_fraction:.1%} of neurons")
    with stage("search (validation)"):
        result = run.search(main)
    run.estimated = result.estimated_reference
    if result.found:
        k, alpha = result.selection.n, result.alpha
        _log(f"minimal set: {k} neurons ({k / run.pair.n_neurons:.2%}), alpha {alpha}")
        return result, k, alpha, True
    best = _best_evaluated(run, main, result.frontier)
    k, alpha, ok = best["k"], best["alpha"], run.ok(best)
    _log(f"goal not reached within {cfg.max_fraction:.1%}; " + ("best acceptable point" if ok else
         "no point met the constraint, the best of them") + f": {k} neurons, alpha {alpha}")
    return result, k, alpha, ok


def _best_evaluated(run: _Run, scores: NeuronScores, points: list[dict[str, Any]]) -> dict[str, Any]:
    """The best acceptable point evaluated in full.

    When only estimates exist, each alpha's best estimated point is evaluated (and appended to
    ``points``) and the best of those is returned: estimates rank points, evaluations choose.
    """
    evaluated = [p for p in points if p.get("measured") != "estimate"]
    if not evaluated:
        for alpha in dict.fromkeys(p["alpha"] for p in points):
            guess = run.best([p for p in points if p["alpha"] == alpha])
            evaluated.append(run.point(scores, guess["k"], alpha, estimate=False))
        points += evaluated
    return run.best(evaluated)


def _baseline_alpha(run: _Run, scores: NeuronScores, k: int) -> tuple[float, bool, list[dict[str, Any]]]:
    """Stage 3, validation: a baseline's alpha at the main method's k (the same alpha grid and rule).

    With estimates (``cfg.screen``) every alpha is estimated and only the best one evaluated in full.
    Returns the alpha, whether it met the constraint in full evaluation, and the points measured.
    """
    estimate = bool(run.estimated)
    points = [run.point(scores, k, a, estimate=estimate) for a in run.cfg.alphas]
    chosen = run.best(points)
    if estimate:
        chosen = run.point(scores, k, chosen["alpha"], estimate=False)
        points.append(chosen)
    return chosen["alpha"], run.ok(chosen), points


def _baseline_minimal(run: _Run, scores: NeuronScores) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Stage 3b, validation: a baseline's own minimal set, by the main method's search (k and alpha).

    Returns a summary (``found``, ``k``, ``fraction``, ``alpha``) and the points measured.
    """
    result = run.search(scores)
    return _minimal_summary(run, result), result.frontier


def _minimal_summary(run: _Run, result: SearchResult) -> dict[str, Any]:
    """What ``extra.minimal_sets`` records of one method's search: found, k, fraction, alpha, max_fraction."""
    k = result.selection.n if result.selection is not None else None
    return {"found": result.found, "k": k, "fraction": None if k is None else k / run.pair.n_neurons,
            "alpha": result.alpha, "max_fraction": run.cfg.max_fraction}


def _evaluate_test(run: _Run, main: str, all_scores: dict[str, NeuronScores], k: int, chosen: dict[str, float],
                   acceptable: dict[str, bool]) -> tuple[dict[str, Block], NeuronPatch, dict[str, list]]:
    """Stage 4, test (read once): target, donor, the patched target and every baseline at its chosen alpha."""
    _log("test-split evaluation")
    items: dict[str, list[dict[str, Any]]] = {"target": [], "donor": [], "patched": []}
    blocks: dict[str, Block] = {"target": run.measure(run.pair.target, "test", items["target"]),
                                "donor": run.measure(run.pair.donor, "test", items["donor"])}
    main_patch = None
    for method, a in chosen.items():
        patch = NeuronPatch.from_pair(run.pair, all_scores[method].top_k(k), a, scores=all_scores[method],
                                      meta={"method": method, "behaviour": run.behaviour.name})
        with patch.applied(run.pair.target):
            blocks[method] = {"method": method, "n_neurons": k, "alpha": a,
                              "acceptable_on_validation": acceptable[method],
                              **run.measure(run.pair.target, "test", items["patched"] if method == main else None)}
        if method == main:
            main_patch = patch
        if method == "random" and run.cfg.random_seeds > 1:
            blocks[method].update(_random_seeds(run, k, a, blocks[method]))
    assert main_patch is not None
    return blocks, main_patch, items


def _random_seeds(run: _Run, k: int, alpha: float, first: Block) -> dict[str, Any]:
    """The random baseline's spread on test: ``cfg.random_seeds`` seeds at the same k and alpha.

    Returns ``seeds`` (each seed's numbers) and, per number, ``{name}_seed_mean`` and ``{name}_seed_sd``.
    """
    cfg = run.cfg
    numbers = [n for n, v in first.items() if isinstance(v, float) and not is_companion(n) and n != "alpha"]
    per_seed = [{"seed": cfg.seed, **{n: first[n] for n in numbers}}]
    for seed in range(cfg.seed + 1, cfg.seed + cfg.random_seeds):
        ranking = score(run.pair, run.behaviour, "random", seed=seed, progress=False)
        with NeuronPatch.from_pair(run.pair, ranking.top_k(k), alpha).applied(run.pair.target):
            block = run.measure(run.pair.target, "test")
        per_seed.append({"seed": seed, **{n: block[n] for n in numbers}})
    out: dict[str, Any] = {"seeds": per_seed}
    for n in numbers:
        vals = [s[n] for s in per_seed]
        out[f"{n}_seed_mean"], out[f"{n}_seed_sd"] = statistics.mean(vals), statistics.stdev(vals)
    return out


def _write_run(out_dir: str | Path, report: Report, patch: NeuronPatch, all_scores: dict[str, NeuronScores],
               frontier: list[dict[str, Any]], items: dict[str, list[dict[str, Any]]]) -> None:
    """Stage 5: the run directory's files, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.save(out / "metrics.json")
    patch.save(out / "patch.safetensors")
    (out / "scores").mkdir(exist_ok=True)
    for method, s in all_scores.items():
        s.save(out / "scores" / f"{method}.safetensors")
    atomic_write_text(out / "frontier.json", json.dumps(frontier, indent=1, default=float))
    atomic_write_text(out / "items.jsonl", "".join(json.dumps({"model": name, **r}, default=float) + "\n"
                                                   for name, recs in items.items() for r in recs))


def transfer(
    pair: ModelPair,
    behaviour: Behaviour,
    *,
    side_effects: Sequence[Behaviour] = (),
    constraint: Constraint | None = None,
    config: TransferConfig = TransferConfig(),
    scores: NeuronScores | None = None,
    reference: Reference | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> TransferResult:
    """Find the minimal transplant of ``behaviour`` from donor to target and compare it with baselines.

    ``constraint(point, reference)`` gets a validation point's numbers and the donor's and
    target's (``reference['donor']``, ``reference['target']``) and says whether it is acceptable
    (e.g. harmless refusal no higher than the donor's). Baselines get the same neuron budget as the
    found patch and the same alpha choice on validation, and (``config.search_baselines``) the main
    method's whole search for their own minimal set (``report.extra["minimal_sets"]``). With
    ``config.screen`` (default) search points are decided by cheap estimates and only the points that
    matter are evaluated in full (:func:`~cnt_lens.search.search_minimal`); every number reported is a
    full evaluation. Returns a :class:`TransferResult` (report,
    patch, scores by method); ``scores`` (e.g. from :func:`~cnt_lens.search.iterative_scores`)
    replaces scoring with ``config.method`` for the main ranking. With ``out_dir``, writes
    ``metrics.json``, ``patch.safetensors`` + ``patch.json``, ``scores/*.safetensors``,
    ``frontier.json`` and ``items.jsonl`` (one line per test prompt and model — target, donor,
    patched — with its response and verdict: what the rates in ``metrics.json`` were counted from), and
    remembers every evaluation and scoring pass in ``out_dir/resume`` as it finishes
    (:func:`~cnt_lens.resume.resumable`): the same call again, after a kill or with one more baseline,
    recomputes only what it has not done.

    Stages: score (train) → choose the point (validation) → each baseline's alpha at the same k and
    its own minimal set (validation) → evaluate (test, once) → write. Before any scoring, both models pass
    :func:`~cnt_lens.behaviours.canary` and donor and target must differ on the behaviour on validation
    (:func:`~cnt_lens.search.measure_reference`, or ``reference`` when the caller measured it): a run
    that cannot succeed stops in seconds.
    """
    with resumable(out_dir) if out_dir is not None else contextlib.nullcontext():
        return _transfer(pair, behaviour, side_effects, constraint, config, scores, reference, out_dir, progress)


def _transfer(pair: ModelPair, behaviour: Behaviour, side_effects: Sequence[Behaviour], constraint: Constraint | None,
              config: TransferConfig, scores: NeuronScores | None, reference: Reference | None,
              out_dir: str | Path | None, progress: bool) -> TransferResult:
    """The stages of :func:`transfer`."""
    cfg = config
    t0 = time.time()
    if reference is None:
        with stage("canary"):
            canary(pair.target)
            canary(pair.donor)
        _log("donor and target on validation")
        with stage("donor and target (validation)"):
            reference = measure_reference(pair, behaviour, side_effects, split="validation",
                                          batch_size=cfg.batch_size)
    run = _Run(pair, behaviour, side_effects, constraint, cfg, reference, progress)
    main, all_scores = _score_all(run, scores)
    result, k, alpha, main_ok = _choose_point(run, all_scores[main])
    frontier = list(result.frontier)
    chosen, acceptable = {main: alpha}, {main: main_ok}
    minimal = {main: _minimal_summary(run, result)}
    for method in cfg.baselines:
        _log(f"baseline {method}: alpha search at k={k}")
        with stage(f"baseline {method} (validation)"):
            chosen[method], acceptable[method], points = _baseline_alpha(run, all_scores[method], k)
            frontier += points
            if cfg.search_baselines:
                minimal[method], points = _baseline_minimal(run, all_scores[method])
                frontier += points
    with stage("test evaluation"):
        blocks, main_patch, items = _evaluate_test(run, main, all_scores, k, chosen, acceptable)
    report = Report(
        behaviour=behaviour.name, split="test", n_neurons_total=pair.n_neurons, donor=blocks["donor"],
        target=blocks["target"], patched={**blocks[main], "goal_reached_on_validation": result.found},
        baselines=[blocks[m] for m in cfg.baselines], frontier=frontier,
        extra={"config": {k_: (list(v) if isinstance(v, tuple) else v) for k_, v in vars(cfg).items()},
               "validation_reference": reference, "validation_estimates": run.estimated, "minimal_sets": minimal,
               "wall_time_s": round(time.time() - t0, 1)},
    )
    if out_dir is not None:
        with stage("write run"):
            _write_run(out_dir, report, main_patch, all_scores, frontier, items)
    return TransferResult(report, main_patch, all_scores)
