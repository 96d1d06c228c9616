"""One transfer, end to end: score → minimal search → baselines at the same budget → test evaluation.

:func:`transfer` is what ``cnt-lens demo`` (and every application) runs. Splits are kept apart:
scores come from **train**, the minimal set and every alpha are chosen on **validation**, and the
numbers reported are measured on **test**, which nothing before has seen.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .behaviours import Behaviour, canary
from .constraints import Constraint
from .evaluate import Report, measure
from .files import atomic_write_text
from .models import ModelPair
from .scoring import SCORERS, score
from .search import measure_reference, search_minimal
from .selection import NeuronScores
from .stats import Block, Reference
from .transplant import NeuronPatch

__all__ = ["TransferConfig", "transfer"]



@dataclass
class TransferConfig:
    """Settings of :func:`transfer` (all recorded in ``metrics.json``)."""

    method: str = "weight_attribution"
    baselines: Sequence[str] = ("attribution", "activation_contrast", "wanda", "snip", "weight_diff",
                                "nlsr_drift", "random")
    goal: float = 0.9
    alphas: Sequence[float] = (1.0, 2.0, 4.0, 8.0)
    max_fraction: float = 0.05
    batch_size: int = 16
    score_batch_size: int = 8
    positions: Any = "all"
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


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
) -> tuple[Report, NeuronPatch | None, dict[str, NeuronScores]]:
    """Find the minimal transplant of ``behaviour`` from donor to target and compare it with baselines.

    ``constraint(point, reference)`` gets a validation point's numbers and the donor's and
    target's (``reference['donor']``, ``reference['target']``) and says whether it is acceptable
    (e.g. harmless refusal no higher than the donor's). Baselines get the same neuron budget as the
    found patch and the same alpha choice on validation. Returns (report, patch, scores by method);
    ``scores`` (e.g. from :func:`~cnt_lens.search.iterative_scores`) replaces scoring with
    ``config.method`` for the main ranking. With ``out_dir``, writes ``metrics.json``,
    ``patch.safetensors`` + ``patch.json``, ``scores/*.safetensors``, ``frontier.json`` and
    ``items.jsonl`` (one line per test prompt and model — target, donor, patched — with its
    response and verdict: what the rates in ``metrics.json`` were counted from) there.

    Before any scoring, both models pass :func:`~cnt_lens.behaviours.canary` and donor and target must
    differ on the behaviour on validation (:func:`~cnt_lens.search.measure_reference`, or ``reference``
    when the caller measured it): a run that cannot succeed stops in seconds.
    """
    cfg = config
    t0 = time.time()
    if reference is None:
        canary(pair.target)
        canary(pair.donor)
        _log("donor and target on validation")
        reference = measure_reference(pair, behaviour, side_effects, split="validation", batch_size=cfg.batch_size)
    all_scores: dict[str, NeuronScores] = {}
    if scores is None:
        main, to_score = cfg.method, [cfg.method, *cfg.baselines]
    else:
        main, to_score = scores.method, list(cfg.baselines)
        all_scores[main] = scores
    for method in to_score:
        _log(f"scoring: {method}")
        options = SCORERS[method].options
        kwargs = {**({"utility": side_effects[0]} if "utility" in options and side_effects else {}),
                  **({"seed": cfg.seed} if "seed" in options else {})}
        all_scores[method] = score(pair, behaviour, method, split="train", batch_size=cfg.score_batch_size,
                                   positions=cfg.positions, progress=progress, **kwargs)
    def check(point: Block) -> bool:
        return constraint is None or constraint(point, reference)

    def better(point: dict[str, Any]) -> tuple[float, float]:
        return rank_key(point, reference, behaviour)

    _log(f"search_minimal over alphas {list(cfg.alphas)} up to {cfg.max_fraction:.1%} of neurons")
    result = search_minimal(pair, behaviour, all_scores[main], goal=cfg.goal, alphas=cfg.alphas,
                            max_fraction=cfg.max_fraction, side_effects=side_effects,
                            constraint=constraint, reference=reference, batch_size=cfg.batch_size,
                            progress=progress)
    frontier = list(result.frontier)
    if result.found:
        k, alpha = result.selection.n, result.alpha
        _log(f"minimal set: {k} neurons ({k / pair.n_neurons:.2%}), alpha {alpha}")
    else:
        # Report the best point the search saw within budget: the most gap closed among acceptable points.
        ok = [p for p in frontier if check(p)] or frontier
        best = max(ok, key=better)
        k, alpha = best["k"], best["alpha"]
        _log(f"goal not reached within {cfg.max_fraction:.1%}; best acceptable point: {k} neurons, alpha {alpha}")

    def best_alpha(scores: NeuronScores) -> tuple[float, list[dict[str, Any]]]:
        points = []
        for a in cfg.alphas:
            with NeuronPatch.from_pair(pair, scores.top_k(k), a).applied_to(pair.target):
                m = measure(pair.target, [behaviour, *side_effects], "validation", batch_size=cfg.batch_size)
            gap = reference["donor"][behaviour.headline] - reference["target"][behaviour.headline]
            closed = (m[behaviour.headline] - reference["target"][behaviour.headline]) / gap
            points.append({"method": scores.method, "k": k, "fraction": k / pair.n_neurons, "alpha": a,
                           "gap_closed": closed, "reached": closed >= cfg.goal and check(m), **m})
        ok = [p for p in points if check(p)] or points
        return max(ok, key=better)["alpha"], points

    chosen = {main: alpha}
    # whether the chosen alpha met the constraint on validation (a baseline with no acceptable alpha
    # is reported at its most effective one, flagged, rather than dropped)
    acceptable = {main: result.found or any(check(p) for p in frontier if p["k"] == k and p["alpha"] == alpha)}
    for method in cfg.baselines:
        _log(f"baseline {method}: alpha search at k={k}")
        chosen[method], pts = best_alpha(all_scores[method])
        acceptable[method] = any(check(p) for p in pts if p["alpha"] == chosen[method])
        frontier += pts

    _log("test-split evaluation")
    split = "test"
    items: dict[str, list[dict[str, Any]]] = {"target": [], "donor": [], "patched": []}
    target_m = measure(pair.target, [behaviour, *side_effects], split, batch_size=cfg.batch_size,
                       items=items["target"])
    donor_m = measure(pair.donor, [behaviour, *side_effects], split, batch_size=cfg.batch_size, items=items["donor"])
    blocks: dict[str, dict[str, Any]] = {}
    main_patch = None
    for method, a in chosen.items():
        patch = NeuronPatch.from_pair(pair, all_scores[method].top_k(k), a, scores=all_scores[method],
                                      meta={"method": method, "behaviour": behaviour.name})
        with patch.applied_to(pair.target):
            blocks[method] = {"method": method, "n_neurons": k, "alpha": a,
                              "acceptable_on_validation": acceptable[method],
                              **measure(pair.target, [behaviour, *side_effects], split, batch_size=cfg.batch_size,
                                        items=items["patched"] if method == main else None)}
        if method == main:
            main_patch = patch
    report = Report(
        behaviour=behaviour.name, split=split, n_neurons_total=pair.n_neurons, donor=donor_m, target=target_m,
        patched={**blocks[main], "goal_reached_on_validation": result.found},
        baselines=[blocks[m] for m in cfg.baselines], frontier=frontier,
        extra={"config": {k_: (list(v) if isinstance(v, tuple) else v) for k_, v in vars(cfg).items()},
               "validation_reference": reference, "wall_time_s": round(time.time() - t0, 1)},
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report.save(out / "metrics.json")
        if main_patch is not None:
            main_patch.save(out / "patch.safetensors")
        (out / "scores").mkdir(exist_ok=True)
        for method, s in all_scores.items():
            s.save(out / "scores" / f"{method}.safetensors")
        atomic_write_text(out / "frontier.json", json.dumps(frontier, indent=1, default=float))
        atomic_write_text(out / "items.jsonl", "".join(json.dumps({"model": name, **r}, default=float) + "\n"
                                                       for name, recs in items.items() for r in recs))
    return report, main_patch, all_scores
