from __future__ import annotations

import pytest
import torch

from cnt_lens import NeuronScores, Report, score
from cnt_lens.show.plots import (
    MODEL_COLOURS,
    behaviour_shift,
    frontier,
    layer_profile,
    refusal_kl,
    selection_heatmap,
    transfer_figure,
)


def _report():
    return Report(behaviour="marker", split="test", n_neurons_total=96, donor={"marker_rate": 1.0},
                  target={"marker_rate": 0.0}, patched={"marker_rate": 0.9, "method": "weight_attribution"},
                  baselines=[{"marker_rate": 0.1, "method": "random"}])


def test_heatmap_bins_hold_the_max_score_and_selected_counts(planted):
    pair, behaviour, sel = planted
    s = score(pair, behaviour, progress=False)
    fig = selection_heatmap(s, sel, max_bins=12)
    heat = fig.data[0]
    z = torch.tensor(heat.z)
    assert z.shape == (2, 12)  # 48 neurons in bins of 4
    assert torch.allclose(z, s.values.view(2, 12, 4).max(-1).values)
    counts = torch.tensor([[c[1] for c in row] for row in heat.customdata])
    assert counts.sum() == sel.n and torch.equal(counts, sel.mask.view(2, 12, 4).sum(-1))
    marks = fig.data[1]
    assert sorted(zip(marks.y, marks.x)) == sorted(sel.indices())
    by_count = torch.tensor(selection_heatmap(s, sel, max_bins=12, color="selected").data[0].z)
    assert torch.equal(by_count, counts.float())  # coloured by selected neurons, scores in the hover


def test_heatmap_is_readable_for_large_models():
    from cnt_lens import NeuronScores

    s = NeuronScores(torch.randn(80, 28672), "random")
    z = selection_heatmap(s, max_bins=128).data[0].z
    assert len(z) == 80 and len(z[0]) <= 128


def test_layer_profile_counts(planted):
    pair, behaviour, sel = planted
    s = score(pair, behaviour, progress=False)
    fig = layer_profile(sel, s)
    assert list(fig.data[0].y) == sel.per_layer()
    assert list(fig.data[1].y) == s.values.clamp(min=0).sum(1).tolist()
    ranks = NeuronScores(s.values, "iterative_weight_attribution", meta={"rounds": 2})
    assert len(layer_profile(sel, ranks).data) == 1  # no score-mass line for rank-valued scores


def test_behaviour_shift_and_transfer_figure(planted):
    pair, behaviour, sel = planted
    rep = _report()
    fig = behaviour_shift(rep)
    assert [t.name for t in fig.data] == ["target", "patched (weight_attribution)", "donor", "random"]
    assert [t.y[0] for t in fig.data] == [0.0, 0.9, 1.0, 0.1]
    s = score(pair, behaviour, progress=False)
    tf = transfer_figure(s, sel, rep, max_bins=12)
    kinds = [t.type for t in tf.data]
    assert kinds[0] == "heatmap" and kinds.count("bar") == 3  # heatmap beside the behaviour bars
    assert torch.tensor(tf.data[0].z).sum() == sel.n  # the heatmap counts the selected neurons


def test_frontier_lines_per_method_and_alpha():
    pts = [{"method": "m", "alpha": a, "k": k, "gap_closed": k * a / 10} for a in (1.0, 2.0) for k in (4, 1, 2)]
    fig = frontier(pts)
    assert len(fig.data) == 2 and list(fig.data[0].x) == [1, 2, 4]
    assert not fig.layout.shapes


def test_frontier_draws_a_searched_alpha_as_points_coloured_by_alpha():
    searched = [{"method": "m", "alpha": 1 + i / 4, "k": 10 + i, "gap_closed": i / 12,
                 "measured": "estimate" if i % 3 else "evaluation"} for i in range(12)]
    grid = [{"method": "random", "alpha": a, "k": k, "gap_closed": 0.0} for a in (2.0, 4.0) for k in (5, 9)]
    fig = frontier(searched + grid)
    names = [t.name for t in fig.data]
    assert names.count("m, α searched") == 1 and names.count("m, α searched (estimate)") == 1
    assert sum(n.startswith("random α=") for n in names) == 2  # a grid keeps its line per alpha
    est = next(t for t in fig.data if t.name == "m, α searched (estimate)")
    assert list(est.marker.color) == [p["alpha"] for p in searched if p["measured"] == "estimate"]
    assert list(est.x) == [p["k"] for p in searched if p["measured"] == "estimate"]


def test_frontier_draws_each_reference_level_as_a_line():
    pts = [{"method": "m", "alpha": 4.0, "k": k, "refusal": k / 8} for k in (1, 2, 4)]
    fig = frontier(pts, y="refusal", references={"donor": 0.9, "target": 0.05}, title="held out")
    assert [(s.y0, s.y1) for s in fig.layout.shapes] == [(0.9, 0.9), (0.05, 0.05)]
    assert [a.text for a in fig.layout.annotations] == ["donor 0.90", "target 0.05"]
    assert fig.layout.title.text == "held out" and fig.layout.yaxis.title.text == "refusal"
    assert fig.layout.showlegend and fig.data[0].name == "m α=4"  # a single line still names its method


def test_behaviour_shift_puts_rates_and_other_numbers_on_their_own_axes():
    from cnt_lens.core.stats import rate

    block = lambda k: {**rate("refusal_harmful", [True] * k + [False] * (10 - k)), "utility_nll": 3.7 + k / 100}  # noqa: E731
    rep = Report(behaviour="refusal", split="test", n_neurons_total=96, donor=block(9), target=block(0),
                 patched={**block(5), "method": "weight_attribution"}, baselines=[{**block(1), "method": "random"}])
    fig = behaviour_shift(rep)
    assert [a.text for a in fig.layout.annotations] == ["rates (0–1)", "other numbers"]
    rates = [t for t in fig.data if t.xaxis == "x"]
    assert [t.y[0] for t in rates] == [0.0, 0.5, 0.9, 0.1] and all(list(t.x) == ["refusal_harmful"] for t in rates)
    patched = rates[1]
    lo, hi = rep.patched["refusal_harmful_ci95"]
    assert patched.error_y.array[0] == hi - 0.5 and patched.error_y.arrayminus[0] == 0.5 - lo
    assert [list(t.x) for t in fig.data if t.xaxis == "x2"] == [["utility_nll"]] * 4


def test_one_colour_per_model_in_every_figure_and_rates_alone_beside_the_heatmap(planted):
    pair, behaviour, sel = planted
    report = Report(behaviour="refusal", split="test", n_neurons_total=96,
                    donor={"refusal_harmful": 0.9, "refusal_harmful_ci95": [0.8, 0.95], "utility_nll": 3.7},
                    target={"refusal_harmful": 0.1, "refusal_harmful_ci95": [0.05, 0.2], "utility_nll": 3.6},
                    patched={"refusal_harmful": 0.7, "refusal_harmful_ci95": [0.6, 0.8], "utility_nll": 3.65,
                             "method": "weight_attribution"}, baselines=[{"refusal_harmful": 0.2, "method": "random"}])
    s = score(pair, behaviour, progress=False)
    shift, both = behaviour_shift(report), transfer_figure(s, sel, report)
    for fig in (shift, both):
        colours = {t.name.split(" ")[0]: t.marker.color for t in fig.data if t.type == "bar"}
        assert {m: colours[m] for m in MODEL_COLOURS} == MODEL_COLOURS
    assert "random" in {t.name for t in shift.data} and set(MODEL_COLOURS.values()).isdisjoint(
        {t.marker.color for t in shift.data if t.name == "random"})
    bars = [t for t in both.data if t.type == "bar"]
    assert all(list(t.x) == ["refusal_harmful"] for t in bars)  # NLL (nats) is not drawn on a 0–1 axis
    assert both.layout.yaxis.dtick == 1 and layer_profile(sel, s).layout.xaxis.dtick == 1  # whole layers


def test_frontier_marks_the_chosen_point():
    pts = [{"method": "m", "alpha": a, "k": k, "gap_closed": k / 8 * a / 4} for a in (2.0, 4.0) for k in (1, 2, 4)]
    fig = frontier(pts, chosen=pts[4])
    star = [t for t in fig.data if t.name == "chosen"]
    assert len(star) == 1 and (star[0].x[0], star[0].y[0]) == (2, 0.25) and star[0].marker.symbol == "star"


def test_refusal_kl_places_each_model_by_its_refusals_per_100_and_kl_with_both_intervals():
    from cnt_lens.core.stats import mean, rate
    from cnt_lens.method.divergence import KL_NAME

    def block(flags, kls):
        return {**rate("refusal_harmful", flags), **mean(KL_NAME, kls)}

    report = Report(behaviour="refusal", split="test", n_neurons_total=100, target=block([0, 0, 0, 1], [0.0] * 3),
                    donor=block([1, 1, 1, 1], [0.5, 0.7, 0.6]), patched={"method": "m", **block([1, 1, 1, 0], [0.1] * 3)},
                    baselines=[{"method": "random", **block([0, 0, 0, 0], [0.01, 0.02, 0.0])},
                               {"method": "no kl", **rate("refusal_harmful", [1, 0])}])
    fig = refusal_kl(report)
    traces = {t.name: t for t in fig.data}
    assert set(traces) == {"target", "donor", "patched (m)", "baseline random"}  # the row without a KL is left out
    for name, b in (("target", report.target), ("donor", report.donor), ("patched (m)", report.patched),
                    ("baseline random", report.baselines[0])):
        t = traces[name]
        assert t.x[0] == pytest.approx(b[KL_NAME]) and t.y[0] == pytest.approx(100 * b["refusal_harmful"])
        lo, hi = b["refusal_harmful_ci95"]
        assert t.error_y.array[0] == pytest.approx(100 * hi - t.y[0])
        assert t.error_y.arrayminus[0] == pytest.approx(t.y[0] - 100 * lo)
        klo, khi = b[f"{KL_NAME}_ci95"]
        assert t.error_x.array[0] == pytest.approx(khi - t.x[0]) and t.error_x.arrayminus[0] == pytest.approx(t.x[0] - klo)
    bars = {t.name: t.marker.color for t in behaviour_shift(report).data}  # each model's colour of every figure
    assert traces["patched (m)"].marker.color == MODEL_COLOURS["patched"]
    assert traces["target"].marker.color == MODEL_COLOURS["target"] and traces["donor"].marker.color == bars["donor"]
    assert traces["baseline random"].marker.color == bars["random"]
    report.extra["peer_trials"] = {"tool": {"unit": "its markers", "points": [{"per_100": 12.5, "kl": 0.3},
                                                                              {"per_100": 80.0, "kl": 0.02}]}}
    peer = [t for t in refusal_kl(report).data if t.name.startswith("tool trials")]
    assert len(peer) == 1 and "its markers" in peer[0].name and "2;" in peer[0].name
    assert list(peer[0].x) == [0.3, 0.02] and list(peer[0].y) == [12.5, 80.0]
    no_kl = Report(behaviour="refusal", split="test", n_neurons_total=100, target=rate("refusal_harmful", [0, 1]),
                   donor=rate("refusal_harmful", [1, 1]), patched={"method": "m", **rate("refusal_harmful", [1, 0])})
    assert refusal_kl(no_kl) is None
