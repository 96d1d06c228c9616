from __future__ import annotations

import json
from dataclasses import replace

import pytest

from cnt_lens import NeuronPatch, score
from cnt_lens.method.config import ConfigError, SearchConfig, TransferConfig, override
from cnt_lens.method.divergence import KL_NAME
from cnt_lens.method.pareto import nondominated, objectives, pareto_front, search_pareto
from cnt_lens.workflow.testing import EstimatedMarker, planted_pair

PARETO = SearchConfig(goal=0.9, alphas=(0.5, 4.0), max_fraction=0.5, strategy="pareto", trials=12)


def _gap(pair, behaviour, reference, selection, alpha):
    with NeuronPatch.from_pair(pair, selection, alpha).applied(pair.target):
        got = behaviour.evaluate(pair.target, "validation", progress=False)["marker_rate"]
    t, d = reference["target"]["marker_rate"], reference["donor"]["marker_rate"]
    return (got - t) / (d - t)


def test_pareto_search_answers_with_the_fewest_neurons_on_its_front_that_reach_the_goal(arch):
    pair, behaviour, planted = planted_pair(arch, n_planted=8, seed=0)
    s = score(pair, behaviour, progress=False)
    res = search_pareto(pair, behaviour, s, PARETO, progress=False)
    points = res.frontier
    assert len(points) == len({(p.k, p.alpha) for p in points}) <= PARETO.trials  # each distinct point measured once
    assert {p.measured for p in points} == {"evaluation"}  # no screen: every trial is an evaluation
    assert all(0.5 <= p.alpha <= 4.0 and 1 <= p.k <= 0.5 * pair.n_neurons for p in points)
    assert len({p.alpha for p in points}) > 2  # alpha is searched, not a grid
    assert all(KL_NAME in p.numbers for p in points) and all(len(objectives(p)) == 3 for p in points)
    # found, and the answer is the fewest neurons among the points that reached the goal acceptably
    assert res.found and res.selection.n == min(p.k for p in points if p.reached)
    assert _gap(pair, behaviour, res.reference, res.selection, res.alpha) >= 0.9  # verified on its own
    # the front: acceptable points that no other acceptable point beats on every objective
    front = pareto_front(points)
    assert front and res.selection.n in {p.k for p in front}
    for p in points:
        beaten = any(all(a <= b for a, b in zip(objectives(q), objectives(p))) and objectives(q) != objectives(p)
                     for q in points if q.acceptable)
        assert (p in front) == (p.acceptable and not beaten)


def test_nondominated_keeps_exactly_the_points_nothing_beats_on_every_objective():
    import random
    rng = random.Random(0)
    points = [(rng.randint(0, 6), rng.randint(0, 6), rng.randint(0, 6)) for _ in range(60)]
    kept = nondominated(points, key=lambda p: p)
    assert kept == [p for p in points if p in kept]  # input order, duplicates of a kept point kept
    for p in points:
        beaten = [q for q in points if all(a <= b for a, b in zip(q, p)) and q != p]
        assert (p in kept) == (not beaten), (p, beaten[:1])
    # a key turns "more is better" into minimisation: refusals kept only where KL buys fewer of them
    rows = [{"kl": 0.1, "n": 9}, {"kl": 0.2, "n": 9}, {"kl": 0.3, "n": 4}, {"kl": 0.05, "n": 12}]
    assert [r["kl"] for r in nondominated(rows, key=lambda r: (r["kl"], r["n"]))] == [0.1, 0.3, 0.05]


def test_pareto_search_is_reproducible_from_its_seed():
    pair, behaviour, _ = planted_pair("llama", n_planted=8, seed=0)
    s = score(pair, behaviour, progress=False)
    config = replace(PARETO, trials=6)
    runs = [search_pareto(pair, behaviour, s, cfg, progress=False) for cfg in (config, config, replace(config, seed=1))]
    keys = [[(p.k, p.alpha) for p in r.frontier] for r in runs]
    assert keys[0] == keys[1] and keys[0] != keys[2]


def test_pareto_search_leaves_optunas_log_level_as_it_found_it():
    import optuna  # the search extra, installed by scripts/setup like every other Pareto test needs
    pair, behaviour, _ = planted_pair("llama", n_planted=8, seed=0)
    s = score(pair, behaviour, progress=False)
    before = optuna.logging.get_verbosity()
    try:
        optuna.logging.set_verbosity(optuna.logging.DEBUG)  # a user who wants every trial line
        search_pareto(pair, behaviour, s, replace(PARETO, trials=3), progress=False)
        assert optuna.logging.get_verbosity() == optuna.logging.DEBUG
    finally:
        optuna.logging.set_verbosity(before)


def test_screened_pareto_search_evaluates_only_the_points_it_confirms():
    pair, _, _ = planted_pair("llama", n_planted=32, seed=0, strength=1.5)
    behaviour = EstimatedMarker()
    s = score(pair, behaviour, progress=False)
    res = search_pareto(pair, behaviour, s, replace(PARETO, screen=True, confirm=3), progress=False)
    estimated = [p for p in res.frontier if p.measured == "estimate"]
    evaluated = [p for p in res.frontier if p.measured == "evaluation"]
    assert len(estimated) >= PARETO.trials // 2 and 1 <= len(evaluated) <= 3 + 1
    # every full evaluation is of a point the screen measured, fewest neurons first among goal-reaching ones
    assert {(p.k, p.alpha) for p in evaluated} <= {(p.k, p.alpha) for p in estimated}
    assert res.found, "the planted pair's goal is reachable within half the neurons"
    chosen = next(p for p in evaluated if p.k == res.selection.n and p.alpha == res.alpha)
    assert chosen.reached and res.metrics["gap_closed"] == chosen.gap_closed >= 0.9
    assert _gap(pair, behaviour, res.reference, res.selection, res.alpha) >= 0.9
    assert [p.k for p in evaluated] == sorted(p.k for p in evaluated)


def test_pareto_search_respects_max_kl_and_reports_failure_honestly():
    pair, behaviour, _ = planted_pair("llama", n_planted=8, seed=0)
    s = score(pair, behaviour, progress=False)
    free = search_pareto(pair, behaviour, s, replace(PARETO, trials=8), progress=False)
    kls = sorted(p.numbers[KL_NAME] for p in free.frontier)
    bound = kls[len(kls) // 2]
    bounded = search_pareto(pair, behaviour, s, replace(PARETO, trials=8, max_kl=bound), progress=False)
    assert all(p.acceptable == (p.numbers[KL_NAME] <= bound) for p in bounded.frontier)
    if bounded.found:
        assert bounded.metrics[KL_NAME] <= bound
    none = search_pareto(pair, behaviour, s, replace(PARETO, trials=4, max_kl=0.0), progress=False)
    assert not none.found and none.selection is None and not pareto_front(none.frontier)


def test_a_transfer_with_the_pareto_strategy_writes_its_chosen_point(tmp_path):
    from cnt_lens.workflow.runs import run_transfer

    pair, behaviour, _ = planted_pair("gpt2", n_planted=8, seed=2)
    cfg = override(TransferConfig(), {"baselines.methods": ("random",), "search.alphas": (1.0, 2.0),
                                      "search.max_fraction": 0.5, "search.strategy": "pareto", "search.trials": 8,
                                      "baselines.random_seeds": 1, "baselines.search": False})
    run_transfer(pair, behaviour, tmp_path, cfg, progress=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["extra"]["config"]["search"]["strategy"] == "pareto"
    frontier = [p for p in metrics["frontier"] if p["method"] == "weight_attribution"]
    assert len(frontier) == len({(p["k"], p["alpha"]) for p in frontier}) <= 8
    k, alpha = metrics["patched"]["n_neurons"], metrics["patched"]["alpha"]
    assert any(p["k"] == k and p["alpha"] == alpha for p in frontier)  # the test reads a point the search measured


@pytest.mark.parametrize("change, field", [({"strategy": "grid"}, "strategy 'grid'"), ({"trials": 0}, "trials 0"),
                                           ({"confirm": 0}, "confirm 0")])
def test_pareto_settings_out_of_range_are_refused(change, field):
    with pytest.raises(ConfigError, match=field):
        SearchConfig(**change)
