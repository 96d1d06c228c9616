"""End to end on a planted pair: transfer → metrics.json → report.html (and the CLI's report command)."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from cnt_lens.cli import app
from cnt_lens.method.config import TransferConfig, override
from cnt_lens.workflow.pipeline import transfer
from cnt_lens.workflow.runs import run_transfer
from cnt_lens.workflow.testing import planted_pair


def test_transfer_writes_a_complete_run(tmp_path):
    pair, behaviour, planted = planted_pair("llama", n_planted=8, seed=2)
    cfg = override(TransferConfig(), {"baselines.methods": ("attribution", "weight_diff", "random"), "search.alphas": (1.0, 2.0), "search.max_fraction": 0.5})
    run_transfer(pair, behaviour, tmp_path, cfg, progress=False)
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["n_neurons_total"] == pair.n_neurons
    assert {"marker_rate", "method", "n_neurons", "alpha"} <= set(data["patched"])
    assert [b["method"] for b in data["baselines"]] == ["attribution", "weight_diff", "random"]
    assert all(b["n_neurons"] == data["patched"]["n_neurons"] for b in data["baselines"])
    assert data["patched"]["marker_rate"] >= 0.9 * data["donor"]["marker_rate"]
    rnd = next(b for b in data["baselines"] if b["method"] == "random")
    assert data["patched"]["marker_rate"] > rnd["marker_rate"]
    # the random baseline at five seeds, the first being the block's own numbers
    seeds = rnd["seeds"]
    assert [x["seed"] for x in seeds] == [0, 1, 2, 3, 4] and seeds[0]["marker_rate"] == rnd["marker_rate"]
    assert abs(rnd["marker_rate_seed_mean"] - sum(x["marker_rate"] for x in seeds) / 5) < 1e-12
    assert all(x["marker_rate"] < data["patched"]["marker_rate"] for x in seeds)
    assert (tmp_path / "patch.safetensors").is_file() and (tmp_path / "scores" / "random.safetensors").is_file()
    # the per-prompt records recount to the published rates, for every model
    items = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    for name in ("target", "donor", "patched"):
        trig = [i["marked"] for i in items if i["model"] == name and i["set"] == "trigger"]
        assert trig and sum(trig) / len(trig) == data[name]["marker_rate"]
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report.html").read_text()
    assert not re.search(r'<(script|link)[^>]+(src|href)="https?://', page)  # plotly.js inlined, nothing fetched
    assert page.count('class="plotly-graph-div"') >= 3  # transfer figure, layer profile, behaviour shift
    assert '"type":"heatmap"' in page.replace(" ", "")  # the selection heatmap's figure data, not plotly.js


def test_a_one_pass_run_ranks_with_the_runs_contrast_and_preserved_side_effects(tmp_path):
    import torch

    from cnt_lens import NeuronScores, Utility, score

    pair, behaviour, _ = planted_pair("llama", n_planted=8, seed=2)
    cfg = override(TransferConfig(), {"baselines.methods": ("random",), "search.alphas": (1.0, 2.0), "search.max_fraction": 0.5, "baselines.random_seeds": 1, "baselines.search": False,
                                      "ranking.contrast": 0.5, "ranking.preserve_weights": (10.0,)})
    run_transfer(pair, behaviour, tmp_path, cfg, side_effects=[Utility()], progress=False)
    saved = NeuronScores.load(tmp_path / "scores" / "weight_attribution.safetensors")
    penalised = score(pair, behaviour, split="train", contrast=0.5, preserve=[Utility()], preserve_weight=10.0,
                      progress=False)
    plain = score(pair, behaviour, split="train", progress=False)
    assert saved.meta["contrast"] == 0.5 and saved.meta["preserve"] == ["utility"]
    assert torch.allclose(saved.values, penalised.values) and not torch.allclose(saved.values, plain.values)
    stages = {r["stage"] for r in json.loads((tmp_path / "timings.json").read_text())["stages"]}
    assert "score weight_attribution" in stages


def test_constraints_see_the_reference_and_can_reject(tmp_path):
    pair, behaviour, planted = planted_pair("gpt2", n_planted=8, seed=2)
    cfg = override(TransferConfig(), {"baselines.methods": ("random",), "search.alphas": (1.0, 2.0), "search.max_fraction": 0.5})
    seen = []

    def no_worse_than_donor_on_controls(point, reference):
        seen.append(reference)
        return point["marker_rate_control"] <= reference["donor"]["marker_rate_control"] + 0.05

    result = transfer(pair, behaviour, cfg, constraint=no_worse_than_donor_on_controls, progress=False)
    report, patch = result.report, result.patch
    assert seen and {"donor", "target"} <= set(seen[0])
    assert report.patched["goal_reached_on_validation"] and patch is not None
    report = transfer(pair, behaviour, cfg, constraint=lambda p, r: False, progress=False).report
    assert not report.patched["goal_reached_on_validation"]
    assert all(not p["reached"] for p in report.frontier)
    assert not any(b["acceptable_on_validation"] for b in [report.patched, *report.baselines])


def test_application_table_is_consistent():
    """Every application preserves exactly its side effects and rounds at a searched scale; realign reads
    refusal after the attack's prefix."""
    from cnt_lens.experiments.applications import APPLICATIONS
    from cnt_lens.experiments.recipes import TASK_PREFIX

    for application in APPLICATIONS.values():
        side = application.side_effects()
        assert len(application.preserve_weights) == len(side) and side[0].name == "utility"
        assert application.goal >= 0.9 and 0 < application.max_fraction <= 0.05 and application.rounds >= 1
        # the re-scoring rounds apply their picks at a scale the search explores
        assert min(application.alphas) <= application.round_alpha <= max(application.alphas) and list(application.alphas) == sorted(application.alphas)
    realign = APPLICATIONS["realign"]
    assert realign.behaviour().response_prefix == TASK_PREFIX
    assert [b.name for b in realign.side_effects()] == ["utility", "format_task"]
    assert realign.side_effects()[1].prefix == TASK_PREFIX and 1.0 in realign.alphas


def test_cross_protocol_re_splits_refusal_and_refuses_behaviours_without_families(tmp_path):
    from cnt_lens.experiments.applications import APPLICATIONS, PROTOCOLS, run_application

    realign = PROTOCOLS["cross"](APPLICATIONS["realign"].behaviour())
    assert realign.response_prefix and {r["family"] for r in realign.harmful.split("validation")} == {"advbench"}
    assert {r["role"] for r in realign.harmless.split("test")} == {"selection", "held_out"}
    assert PROTOCOLS["split"](APPLICATIONS["enhance"].behaviour()).harmful.name == "harmful+held_out/cross"
    with pytest.raises(ValueError, match="no prompt families"):  # raised before any model is loaded
        run_application("bias-removal", tmp_path / "b", protocol="cross")
    with pytest.raises(ValueError, match="unknown protocol"):
        run_application("enhance", tmp_path / "e", protocol="families")
    with pytest.raises(ValueError, match="reads a refusal; 'bias-removal' transfers 'stereotype_bias'"):
        run_application("bias-removal", tmp_path / "b", objective="continuation")
    with pytest.raises(ValueError, match="unknown objective"):
        run_application("enhance", tmp_path / "e", objective="ending")
    assert not (tmp_path / "b").exists() and not (tmp_path / "e").exists()


def test_rank_key_breaks_headline_ties_with_the_continuous_number():
    """Bias removal: every point still prefers the stereotype in all pairs (0 of the score gap closed); the
    one that moved the log-prob gap furthest toward the donor must win, and a headline gain beats any tie-break."""
    from cnt_lens import Refusal, StereotypeBias
    from cnt_lens.workflow.pipeline import rank_key

    reference = {"target": {"stereotype_score": 100.0, "logprob_gap": 7.5},
                 "donor": {"stereotype_score": 80.0, "logprob_gap": 1.5}}
    bias = StereotypeBias()
    small = {"gap_closed": 0.0, "stereotype_score": 100.0, "logprob_gap": 7.0}
    large = {"gap_closed": 0.0, "stereotype_score": 100.0, "logprob_gap": 3.0}
    flipped = {"gap_closed": 0.05, "stereotype_score": 99.0, "logprob_gap": 6.9}
    assert max([small, large], key=lambda p: rank_key(p, reference, bias)) is large
    assert rank_key(large, reference, bias)[1] == (3.0 - 7.5) / (1.5 - 7.5)
    assert max([small, large, flipped], key=lambda p: rank_key(p, reference, bias)) is flipped
    # a behaviour without a tie-break orders by the headline alone
    assert rank_key(large, reference, Refusal())[1] == 0.0


def test_transfer_stops_before_scoring_when_donor_and_target_agree(monkeypatch):
    import pytest

    import cnt_lens.workflow.pipeline as pl
    from cnt_lens import ModelPair
    from cnt_lens.method.search import NoGapError
    from cnt_lens.models import clone_model

    pair, behaviour, _ = planted_pair("llama", n_planted=6, seed=0)
    same = ModelPair(donor=clone_model(pair.target), target=pair.target)
    monkeypatch.setattr(pl, "score", lambda *a, **k: pytest.fail("scored before checking for a gap"))
    with pytest.raises(NoGapError, match="no gap to close"):
        transfer(same, behaviour, override(TransferConfig(), {"baselines.methods": ()}), progress=False)


def test_a_screened_transfer_reports_only_full_evaluations_and_gives_baselines_the_whole_search(tmp_path):
    from cnt_lens.workflow.testing import EstimatedMarker

    pair, _, _ = planted_pair("llama", n_planted=32, seed=0, strength=1.5)
    behaviour = EstimatedMarker()
    cfg = override(TransferConfig(), {"baselines.methods": ("attribution", "random"), "search.alphas": (1.0, 2.0), "search.max_fraction": 0.5})
    report = run_transfer(pair, behaviour, tmp_path, cfg, progress=False)
    frontier = report.frontier
    assert {p["measured"] for p in frontier} == {"estimate", "evaluation"}
    # the chosen point and each baseline's chosen alpha were evaluated in full on validation
    main = report.patched
    assert any(p["method"] == main["method"] and p["k"] == main["n_neurons"] and p["alpha"] == main["alpha"]
               and p["measured"] == "evaluation" and p["reached"] for p in frontier)
    for b in report.baselines:
        full = [p for p in frontier if p["method"] == b["method"] and p["k"] == main["n_neurons"]
                and p["alpha"] == b["alpha"] and p["measured"] == "evaluation"]
        assert full and b["acceptable_on_validation"]  # no constraint: every point is acceptable
    # every baseline also had the main method's search over k and alpha
    minimal = report.extra["minimal_sets"]
    assert set(minimal) == {main["method"], "attribution", "random"}
    assert minimal[main["method"]]["k"] == main["n_neurons"]
    assert {p["k"] for p in frontier if p["method"] == "random"} > {main["n_neurons"]}  # more than the same-k points
    assert minimal["random"]["found"] is False or minimal["random"]["k"] >= minimal[main["method"]]["k"]
    # test numbers are evaluations: the items recount them
    assert report.extra["validation_estimates"]["donor"]["marker_rate"] == 1.0
    items = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    trig = [i["marked"] for i in items if i["model"] == "patched" and i["set"] == "trigger"]
    assert "response" in next(i for i in items if i["model"] == "patched")  # the evaluation's records, not estimates
    assert sum(trig) / len(trig) == report.patched["marker_rate"]


def test_a_screened_transfer_that_misses_its_goal_reports_an_evaluated_point():
    from cnt_lens.workflow.testing import EstimatedMarker

    pair, _, _ = planted_pair("llama", n_planted=32, seed=0, strength=1.5)
    cfg = override(TransferConfig(), {"baselines.methods": ("random",), "search.alphas": (1.0, 2.0), "search.max_fraction": 2 / pair.n_neurons, "baselines.random_seeds": 1})
    report = transfer(pair, EstimatedMarker(), cfg, progress=False).report
    assert not report.patched["goal_reached_on_validation"]
    main = [p for p in report.frontier if p["method"] == report.patched["method"]]
    evaluated = [p for p in main if p["measured"] == "evaluation"]
    estimated = [p for p in main if p["measured"] == "estimate"]
    # the estimate reached the goal at no alpha: only the alpha whose (acceptable) answer closed the most of the
    # estimated gap is refined in full
    assert evaluated and {p["alpha"] for p in evaluated} == {max(estimated, key=lambda p: p["gap_closed"])["alpha"]}
    best = max(evaluated, key=lambda p: p["gap_closed"])
    assert (report.patched["n_neurons"], report.patched["alpha"]) == (best["k"], best["alpha"])
    assert "seeds" not in report.baselines[0]  # one random seed asked for: no spread
