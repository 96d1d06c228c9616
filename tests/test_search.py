from __future__ import annotations

from cnt_lens import score, search_minimal
from cnt_lens.testing import planted_pair


def test_search_finds_a_set_no_larger_than_planted_that_reaches_the_goal(arch):
    pair, behaviour, planted = planted_pair(arch, n_planted=8, seed=0)
    s = score(pair, behaviour, progress=False)
    res = search_minimal(pair, behaviour, s, goal=0.9, alphas=(1.0, 2.0), max_fraction=0.5, progress=False)
    assert res.found and res.selection.n <= planted.n
    # verified on its own: apply the found patch and measure again
    patch = res.patch(pair)
    patch.apply(pair.target)
    got = behaviour.evaluate(pair.target, "validation", progress=False)["marker_rate"]
    patch.revert(pair.target)
    t, d = res.reference["target"]["marker_rate"], res.reference["donor"]["marker_rate"]
    assert (got - t) / (d - t) >= 0.9
    assert {p["alpha"] for p in res.frontier} <= {1.0, 2.0} and all("gap_closed" in p for p in res.frontier)


def test_search_reports_failure_honestly(arch):
    pair, behaviour, planted = planted_pair(arch, n_planted=8, seed=1)
    s = score(pair, behaviour, "random", progress=False)
    res = search_minimal(pair, behaviour, s, goal=0.9, alphas=(1.0,), max_fraction=0.02, progress=False)
    assert not res.found and res.frontier and not any(p["reached"] for p in res.frontier)
