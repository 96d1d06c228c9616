from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch

from cnt_lens import score, search_minimal
from cnt_lens.method.config import SearchConfig
from cnt_lens.method.search import measure_point
from cnt_lens.workflow.testing import EstimatedMarker, planted_pair


def test_search_finds_a_set_no_larger_than_planted_that_reaches_the_goal(arch):
    pair, behaviour, planted = planted_pair(arch, n_planted=8, seed=0)
    s = score(pair, behaviour, progress=False)
    res = search_minimal(pair, behaviour, s, SearchConfig(goal=0.9, alphas=(1.0, 2.0), max_fraction=0.5), progress=False)
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
    res = search_minimal(pair, behaviour, s, SearchConfig(goal=0.9, alphas=(1.0,), max_fraction=0.02), progress=False)
    assert not res.found and res.frontier and not any(p["reached"] for p in res.frontier)


def test_iterative_scores_rank_round_picks_first_and_restore_the_target(arch):
    import torch

    from cnt_lens import NeuronSelection
    from cnt_lens.method.rounds import iterative_scores
    from cnt_lens.models import hf_state_dict

    pair, behaviour, planted = planted_pair(arch, n_planted=8, seed=0)
    before = {k: v.clone() for k, v in hf_state_dict(pair.target).items()}
    s = iterative_scores(pair, behaviour, budget=8 / pair.n_neurons, rounds=2, alpha=1.0, progress=False)
    assert all(torch.equal(before[k], v) for k, v in hf_state_dict(pair.target).items())
    assert s.meta["rounds"] == 2 and [h["picked"] for h in s.meta["history"]] == [4, 4]
    assert sorted(s.values.flatten().tolist()) == list(range(1, pair.n_neurons + 1))  # a total order
    assert s.top_k(8).overlap(planted) >= 0.95
    # round 2 was scored on the patched target: the first 4 picks are exactly round 1's top 4
    first = score(pair, behaviour, progress=False).top_k(4)
    assert s.top_k(4) == NeuronSelection(first.mask)


def test_next_overlap_counts_shared_next_picks_outside_the_chosen():
    from cnt_lens import NeuronScores, NeuronSelection
    from cnt_lens.method.rounds import next_overlap

    a = NeuronScores(torch.tensor([[9.0, 8.0, 7.0, 6.0], [5.0, 4.0, 3.0, 2.0]]), "weight_attribution", "b", 1)
    b = NeuronScores(torch.tensor([[9.0, 1.0, 7.0, 8.0], [5.0, 4.0, 3.0, 2.0]]), "weight_attribution", "b", 1)
    none = NeuronSelection.empty(2, 4)
    assert next_overlap(a, a, none, 3) == 1.0
    assert next_overlap(a, b, none, 2) == 0.5  # a: (0,0) (0,1); b: (0,0) (0,3)
    chosen = NeuronSelection(torch.tensor([[True, False, False, False], [False] * 4]))
    assert next_overlap(a, b, chosen, 2) == 0.5  # a: (0,1) (0,2); b: (0,3) (0,2)
    assert next_overlap(a, b, chosen, 0) == 1.0


@pytest.mark.parametrize("stop", [0.0, 1.5])
def test_stop_overlap_out_of_range_is_refused(stop):
    from cnt_lens.method.rounds import iterative_scores

    pair, behaviour, _ = planted_pair("llama", n_planted=4, seed=0)
    with pytest.raises(ValueError, match="stop_overlap"):
        iterative_scores(pair, behaviour, budget=4 / pair.n_neurons, rounds=2, stop_overlap=stop, progress=False)


def test_iterative_scores_stop_once_rounds_agree_and_take_the_rest_from_the_last_round():
    from cnt_lens import NeuronPatch, NeuronSelection
    from cnt_lens.method.rounds import iterative_scores

    pair, behaviour, _ = planted_pair("llama", n_planted=8, seed=0)
    kw: dict[str, Any] = dict(budget=8 / pair.n_neurons, rounds=4, alpha=1.0, progress=False)
    full = iterative_scores(pair, behaviour, **kw)
    overlaps = [h["overlap"] for h in full.meta["history"]]
    assert overlaps[0] is None and all(0 <= o <= 1 for o in overlaps[1:]) and full.meta["rounds_run"] == 4
    assert overlaps[1] > 0  # rounds 1 and 2 would both pick planted neurons next
    stopped = iterative_scores(pair, behaviour, stop_overlap=overlaps[1], **kw)  # round 2 reaches it
    assert stopped.meta["rounds_run"] == 2 and [h.get("picked") for h in stopped.meta["history"]] == [2, None]
    first = stopped.top_k(2)
    assert first == full.top_k(2)
    # the rest is round 2's ranking: the target as patched by round 1, scored on its own
    with NeuronPatch.from_pair(pair, first, 1.0).applied(pair.target):
        again = score(pair, behaviour, progress=False)
    rest = again.ranked().flatten().masked_fill(first.mask.flatten(), float("-inf")).topk(6).indices
    expected = first.mask.flatten().clone().index_fill(0, rest, True).view_as(first.mask)
    assert stopped.top_k(8) == NeuronSelection(expected)


def test_per_layer_search_returns_a_per_layer_selection():
    pair, behaviour, planted = planted_pair("llama", n_planted=8, seed=0)
    s = score(pair, behaviour, progress=False)
    res = search_minimal(pair, behaviour, s, SearchConfig(goal=0.9, alphas=(2.0,), max_fraction=0.5, per_layer=True), progress=False)
    assert res.found
    counts = res.selection.per_layer()
    assert len(set(counts)) == 1  # the same number of neurons in every layer
    assert any(p["k"] == res.selection.n and p["reached"] for p in res.frontier)


def _unspecific_pair(arch: str):
    """A planted pair whose donor has 8 more marker-writing neurons that fire on the control word too.

    Copying those is an unspecific side effect, like refusing harmless prompts. Returns the pair, the
    behaviour, the planted selection and the unspecific neurons' flat indices.
    """
    from cnt_lens.models import read_neurons, write_neurons
    from cnt_lens.workflow.testing import CONTROL

    pair, behaviour, planted = planted_pair(arch, n_planted=8, seed=0)
    emb = pair.donor.original_model.get_input_embeddings().weight.detach()
    ctrl = emb[pair.tokenizer.convert_tokens_to_ids(CONTROL)]
    layer0, n0 = planted.mask.nonzero()[0].tolist()
    template = read_neurons(pair.donor, layer0, torch.tensor([n0]))
    free = (~planted.mask).flatten().nonzero().squeeze(1)
    noisy = free[torch.randperm(len(free), generator=torch.Generator().manual_seed(0))[:8]]
    for layer in range(pair.n_layers):
        idx = noisy[noisy // pair.d_mlp == layer] % pair.d_mlp
        if len(idx):
            vals = {k: v.expand(len(idx), *v.shape[1:]).clone() for k, v in template.items()}
            for role in ("W_in", "W_gate"):
                if role in vals:
                    vals[role][:] = ctrl / ctrl.norm() * 2.0
            write_neurons(pair.donor, layer, idx, vals)
    return pair, behaviour, planted, noisy


def test_search_bisects_below_a_budget_whose_side_effects_break_the_constraint(arch):
    """Side effects grow with k: a constraint failing at the full budget can hold at the minimal set."""
    from cnt_lens import NeuronScores

    pair, behaviour, planted, noisy = _unspecific_pair(arch)
    values = planted.mask.float() * 2
    values.view(-1)[noisy] = 1.0  # planted first, then the unspecific neurons
    ranking = NeuronScores(values, "handmade")
    specific = lambda m, ref: m["marker_rate_control"] <= ref["target"]["marker_rate_control"]  # noqa: E731
    res = search_minimal(pair, behaviour, ranking, SearchConfig(goal=0.9, alphas=(1.0,), max_fraction=16 / pair.n_neurons), constraint=specific, progress=False)
    first = res.frontier[0]
    assert first["k"] == 16 and first["gap_closed"] >= 0.9 and not first["reached"]  # the budget is unspecific
    assert res.found and res.selection.n <= planted.n and (res.selection & planted).n == res.selection.n


def test_out_of_reach_goal_ends_at_the_constraints_boundary():
    """No acceptable point reaches the goal: the search ends at the largest acceptable k, evaluated."""
    from cnt_lens import NeuronScores

    pair, behaviour, planted, noisy = _unspecific_pair("gpt2")
    # two planted neurons, then the unspecific ones, then the other planted ones: every set that reaches
    # the goal carries unspecific neurons along, and the constraint breaks before the goal is reached
    first, rest = planted.mask.flatten().nonzero().squeeze(1).split([2, 6])
    values = torch.zeros(pair.n_neurons)
    values[first], values[noisy], values[rest] = 3.0, 2.0, 1.0
    ranking = NeuronScores(values.view(pair.n_layers, pair.d_mlp), "handmade")
    specific = lambda m, ref: m["marker_rate_control"] <= ref["target"]["marker_rate_control"]  # noqa: E731
    res = search_minimal(pair, behaviour, ranking, SearchConfig(goal=0.9, alphas=(1.0,), max_fraction=16 / pair.n_neurons), constraint=specific, progress=False)
    assert not res.found and not any(p["reached"] for p in res.frontier)
    assert any(p["goal_reached"] for p in res.frontier)  # the goal is there, only not acceptably
    # every k measured directly: the acceptable ones are a prefix, and the search's best is its end
    every = [measure_point(pair, [behaviour], ranking, ranking.top_k(k), 1.0, res.reference, constraint=specific)
             for k in range(1, 17)]
    boundary = max(k for k, p in enumerate(every, 1) if p["acceptable"])
    assert all(p["acceptable"] for p in every[:boundary]) and every[boundary - 1]["gap_closed"] > 0
    best = max((p for p in res.frontier if p["acceptable"]), key=lambda p: p["gap_closed"])
    assert best["k"] == boundary and any(p["k"] == boundary + 1 and not p["acceptable"] for p in res.frontier)
    assert len(res.frontier) < 16


def _counting_probe(threshold: int, constraint_up_to: int | None = None):
    """A monotone probe: the goal holds from ``threshold`` on; the constraint only up to ``constraint_up_to``."""
    calls: list[int] = []

    def probe(k: int) -> tuple[bool, bool]:
        calls.append(k)
        return k >= threshold, constraint_up_to is None or k <= constraint_up_to
    return probe, calls


def test_refine_from_a_guess_brackets_then_bisects_to_the_tolerance():
    from cnt_lens.method.search import _from_top, _refine_k

    for guess in (10, 40, 45, 60, 400, 2000):  # below, at, above and far above the answer (45)
        probe, calls = _counting_probe(45)
        k, found = _refine_k(probe, guess, k_max=2000, min_k=1, tolerance=0.1, step=1.25)
        assert found and 45 <= k <= 1.1 * 45, (guess, k)
        assert k in calls  # the answer was probed, not inferred
    near, near_calls = _counting_probe(45)
    _refine_k(near, 48, k_max=2000, min_k=1, tolerance=0.1, step=1.25)
    full, full_calls = _counting_probe(45)
    k, found = _from_top(full, 2000, 1, 0.1)
    assert found and 45 <= k <= 49.5
    assert len(near_calls) < len(full_calls)  # a good guess costs fewer probes than the whole range
    # never reached within k_max: the answer is k_max itself, acceptable and short of the goal
    assert _refine_k(_counting_probe(3000)[0], 100, k_max=2000, min_k=1, tolerance=0.1, step=1.25) == (2000, False)
    # the constraint fails below the smallest passing k: the answer is the constraint's boundary
    for guess in (10, 100, 2000):
        probe, calls = _counting_probe(45, constraint_up_to=40)
        k, found = _refine_k(probe, guess, 2000, 1, 0.1, 1.25)
        assert not found and 40 / 1.1 <= k <= 40 and k in calls, (guess, k)


def test_refine_upward_tries_one_step_then_the_largest_k():
    """A guess below the answer: one ×step probe, then k_max; a goal missed at k_max ends it in three probes."""
    from cnt_lens.method.search import _refine_k

    hopeless, calls = _counting_probe(3000)
    assert _refine_k(hopeless, 100, k_max=2000, min_k=1, tolerance=0.1, step=1.25) == (2000, False)
    assert calls == [100, 125, 2000]
    far, calls = _counting_probe(1500)
    k, found = _refine_k(far, 100, k_max=2000, min_k=1, tolerance=0.1, step=1.25)
    assert found and 1500 <= k <= 1.1 * 1500 and k in calls
    # three probes to bracket (100, 125, 2000), then a geometric bisection of (125, 2000] to 10%
    assert calls[:3] == [100, 125, 2000] and len(calls) <= 3 + math.ceil(math.log2(math.log(2000 / 125) / math.log(1.1)))
    assert _refine_k(_counting_probe(1)[0], 2000, k_max=2000, min_k=1, tolerance=0.1, step=1.25) == (1, True)
    assert _refine_k(_counting_probe(2001)[0], 2000, k_max=2000, min_k=1, tolerance=0.1, step=1.25) == (2000, False)
    # nothing acceptable at any k: no answer
    assert _refine_k(_counting_probe(45, constraint_up_to=0)[0], 100, 2000, 1, 0.1, 1.25) is None


def test_screened_search_confirms_its_point_in_full_with_fewer_evaluations(arch):
    # many weak planted neurons: the minimal set is a real search, not one or two neurons
    pair, _, planted = planted_pair(arch, n_planted=32, seed=0, strength=1.5)
    behaviour = EstimatedMarker()
    s = score(pair, behaviour, progress=False)
    cfg = SearchConfig(goal=0.9, alphas=(1.0, 2.0), max_fraction=0.5)
    full = search_minimal(pair, behaviour, s, cfg, progress=False)
    screened = search_minimal(pair, behaviour, s, replace(cfg, screen=True), progress=False)
    assert full.found and screened.found and screened.alpha == full.alpha
    assert {p["measured"] for p in full.frontier} == {"evaluation"}
    # the screen's own answer was optimistic, the returned point is verified by the evaluation
    est = [p for p in screened.frontier if p["measured"] == "estimate"]
    evaluated = [p for p in screened.frontier if p["measured"] == "evaluation"]
    assert est and min(p["k"] for p in est if p["goal_reached"] and p["alpha"] == screened.alpha) < screened.selection.n
    chosen = next(p for p in evaluated if p["k"] == screened.selection.n)
    assert chosen["reached"] and chosen["gap_closed"] >= 0.9 and screened.metrics["gap_closed"] == chosen["gap_closed"]
    # both land on the same minimal set within the search's tolerance, the screen at fewer full evaluations
    assert abs(screened.selection.n - full.selection.n) <= 0.1 * full.selection.n + 1
    assert len(evaluated) < len(full.frontier)
    assert screened.estimated_reference["donor"]["marker_rate"] >= screened.reference["donor"]["marker_rate"]


def test_a_screen_with_slack_looks_below_a_goal_its_estimate_misses_and_still_answers_in_full():
    pair, _, _ = planted_pair("llama", n_planted=32, seed=0, strength=1.5)
    behaviour = EstimatedMarker()
    s = score(pair, behaviour, progress=False)
    cfg = SearchConfig(goal=0.9, alphas=(1.0, 2.0), max_fraction=0.5)
    full = search_minimal(pair, behaviour, s, cfg, progress=False)
    slack = search_minimal(pair, behaviour, s, replace(cfg, screen=True, slack=0.3), progress=False)
    est = [p for p in slack.frontier if p["measured"] == "estimate"]
    assert est and all(p["goal_reached"] == (p["gap_closed"] >= 0.9 - 0.3) for p in est)  # within the slack counts
    chosen = next(p for p in slack.frontier if p["measured"] == "evaluation" and p["k"] == slack.selection.n
                  and p["alpha"] == slack.alpha)
    assert chosen["reached"] and chosen["gap_closed"] >= 0.9  # the answer itself meets the goal in full
    assert slack.alpha == full.alpha and abs(slack.selection.n - full.selection.n) <= 0.1 * full.selection.n + 1
    with pytest.raises(ValueError, match="slack"):
        search_minimal(pair, behaviour, s, replace(cfg, screen=True, slack=0.9), progress=False)


def test_a_screen_is_the_full_search_when_the_estimate_is_the_evaluation():
    pair, behaviour, _ = planted_pair("llama", n_planted=8, seed=0)
    assert behaviour.estimate_is_evaluation and not EstimatedMarker().estimate_is_evaluation
    s = score(pair, behaviour, progress=False)
    cfg = SearchConfig(goal=0.9, alphas=(1.0, 2.0), max_fraction=0.5)
    full, screened = search_minimal(pair, behaviour, s, cfg, progress=False), search_minimal(pair, behaviour, s, replace(cfg, screen=True), progress=False)
    assert [p["k"] for p in screened.frontier] == [p["k"] for p in full.frontier]
    assert not screened.estimated_reference and screened.selection == full.selection


def test_rescoring_rounds_run_the_donor_once_and_rank_as_if_run_every_round(monkeypatch):
    from cnt_lens import Utility
    from cnt_lens.method.rounds import iterative_scores
    from cnt_lens.method.scoring import attribution

    pair, behaviour, _ = planted_pair("llama", n_planted=8, seed=0)
    runs = {"donor": 0, "target": 0}
    real = attribution.forward

    def counting(model, batch, behaviour, hooks=()):
        runs["donor" if model is pair.donor else "target"] += 1
        return real(model, batch, behaviour, hooks)

    monkeypatch.setattr(attribution, "forward", counting)
    kw = dict(budget=6 / pair.n_neurons, rounds=3, alpha=1.0, contrast=0.5, preserve=[Utility()], progress=False)
    once = iterative_scores(pair, behaviour, **kw)
    donor_once, target_once = runs["donor"], runs["target"]
    runs.update(donor=0, target=0)
    every = iterative_scores(pair, behaviour, donor_metrics=None, **kw)  # no sharing: the donor runs each round
    assert target_once == runs["target"] and donor_once * 3 == runs["donor"]
    assert torch.equal(once.values, every.values)


@dataclass
class _BlindEstimate(EstimatedMarker):
    """An estimate that sees the donor's function and no patched model's: it misreads every transplant."""

    donor: Any = None

    def estimate_items(self, model, split, *, batch_size=16, progress=True):
        items = super().estimate_items(model, split, batch_size=batch_size, progress=progress)
        return [{**i, "marked": i["marked"] and model is self.donor} for i in items]


def test_a_screen_whose_estimate_reaches_the_goal_nowhere_searches_in_full():
    pair, _, _ = planted_pair("llama", n_planted=32, seed=0, strength=1.5)
    behaviour = _BlindEstimate(donor=pair.donor)
    s = score(pair, behaviour, progress=False)
    cfg = SearchConfig(goal=0.9, alphas=(1.0, 2.0), max_fraction=0.5)
    full = search_minimal(pair, behaviour, s, cfg, progress=False)
    screened = search_minimal(pair, behaviour, s, replace(cfg, screen=True), progress=False)
    est = [p for p in screened.frontier if p["measured"] == "estimate"]
    assert screened.estimated_reference["donor"]["marker_rate"] > 0 and est
    assert not any(p["goal_reached"] for p in est)  # the screen found nothing ...
    assert full.found and screened.found  # ... and the search still answers, as the full search does
    assert screened.alpha == full.alpha and abs(screened.selection.n - full.selection.n) <= 0.1 * full.selection.n + 1
    # its acceptable answer, refined in full, reached the goal the estimate missed; then the other alpha in full
    evaluated = [p for p in screened.frontier if p["measured"] == "evaluation"]
    assert evaluated[0]["goal_reached"] and {p["alpha"] for p in evaluated} == {1.0, 2.0}
    chosen = next(p for p in evaluated if p["k"] == screened.selection.n and p["alpha"] == screened.alpha)
    assert chosen["reached"]


def test_alpha_sweep_answers_each_alpha_from_the_one_before():
    """Out of reach: each alpha's largest acceptable k; reachable: the smallest goal k, later alphas below it."""
    from cnt_lens.method.search import _alpha_sweep

    def sweep(table: dict[float, tuple[int, int]]):
        calls: dict[float, list[int]] = {}

        def probe(alpha: float):
            goal_from, ok_up_to = table[alpha]

            def at(k: int) -> tuple[bool, bool]:
                calls.setdefault(alpha, []).append(k)
                return k >= goal_from, k <= ok_up_to
            return at
        return _alpha_sweep(probe, list(table), k_max=2000, min_k=1, tolerance=0.1, step=1.25), calls

    # side effects grow with alpha: the boundary moves down, and no alpha reaches the goal acceptably
    table = {2.0: (3000, 800), 4.0: (1500, 600), 6.0: (900, 450)}
    answers, calls = sweep(table)
    assert [(c.alpha, c.found) for c in answers] == [(2.0, False), (4.0, False), (6.0, False)]
    for c in answers:
        assert table[c.alpha][1] / 1.1 <= c.k <= table[c.alpha][1] and c.k in calls[c.alpha]
    assert len(calls[4.0]) < len(calls[2.0]) and len(calls[6.0]) < len(calls[2.0])  # warm starts are cheaper
    # the goal within the boundary at alpha 4: found there, and alpha 6 only looks below it
    answers, calls = sweep({2.0: (3000, 800), 4.0: (400, 600), 6.0: (300, 250)})
    assert [(c.alpha, c.found) for c in answers] == [(2.0, False), (4.0, True)]
    assert 400 <= answers[-1].k <= 440 and max(calls[6.0]) < answers[-1].k


def test_every_search_point_reads_its_first_token_kl_as_measured_with_its_patch_applied():
    from cnt_lens import NeuronPatch
    from cnt_lens.method.divergence import KL_NAME, first_token_kl, next_token_logprobs

    pair, behaviour, _ = planted_pair("llama", n_planted=8, seed=0)
    s = score(pair, behaviour, progress=False)
    res = search_minimal(pair, behaviour, s, SearchConfig(goal=0.9, alphas=(1.0, 2.0), max_fraction=0.5), progress=False)
    batches = behaviour.kl_batches(pair.tokenizer, "validation", 16)
    unedited = next_token_logprobs(pair.target, batches)
    assert res.reference["target"][KL_NAME] == 0.0
    assert res.reference["donor"][KL_NAME] == pytest.approx(first_token_kl(pair.donor, unedited, batches)[KL_NAME])
    assert len(res.frontier) >= 3
    for p in res.frontier:
        with NeuronPatch.from_pair(pair, s.top_k(p["k"]), p["alpha"]).applied(pair.target):
            direct = first_token_kl(pair.target, unedited, batches)
        assert p[KL_NAME] == pytest.approx(direct[KL_NAME], rel=1e-5, abs=1e-9)
        assert p[f"{KL_NAME}_n"] == len(behaviour.controls.split("validation"))
    assert len({round(p[KL_NAME], 12) for p in res.frontier}) > 1  # it moves with k and alpha


def test_max_kl_accepts_exactly_the_points_within_it_and_the_answer_respects_it():
    from cnt_lens.method.divergence import KL_NAME

    pair, behaviour, _ = planted_pair("llama", n_planted=8, seed=0)
    s = score(pair, behaviour, progress=False)
    config = SearchConfig(goal=0.9, alphas=(1.0, 2.0), max_fraction=0.5)
    free = search_minimal(pair, behaviour, s, config, progress=False)
    kls = sorted(p[KL_NAME] for p in free.frontier)
    bound = kls[len(kls) // 2]  # between the points the free search measured
    bounded = search_minimal(pair, behaviour, s, replace(config, max_kl=bound), progress=False)
    assert all(p["acceptable"] == (p[KL_NAME] <= bound) for p in bounded.frontier)
    assert any(not p["acceptable"] for p in bounded.frontier)
    if bounded.found:
        assert bounded.metrics[KL_NAME] <= bound
    none = search_minimal(pair, behaviour, s, replace(config, max_kl=0.0), progress=False)
    assert not none.found and not any(p["acceptable"] for p in none.frontier)


def test_max_kl_without_kl_inputs_or_out_of_range_is_refused():
    from cnt_lens.core.errors import CntLensError
    from cnt_lens.workflow.testing import MarkerBehaviour

    with pytest.raises(ValueError, match="max_kl"):
        SearchConfig(max_kl=-0.1)

    @dataclass(repr=False)
    class NoKL(MarkerBehaviour):
        def kl_batches(self, tokenizer: Any, split: str | None, batch_size: int) -> list:
            return []

    pair, planted_behaviour, _ = planted_pair("llama", n_planted=8, seed=0)
    behaviour = NoKL(prompts=planted_behaviour.prompts, controls=planted_behaviour.controls, marker=planted_behaviour.marker)
    s = score(pair, behaviour, progress=False)
    with pytest.raises(CntLensError, match="max_kl=0.5 bounds the first-token KL"):
        search_minimal(pair, behaviour, s, SearchConfig(alphas=(1.0,), max_fraction=0.5, max_kl=0.5), progress=False)
