"""A run remembers its evaluations and scores in its directory: a rerun continues, and never reuses the wrong result."""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass

import pytest
import torch

import cnt_lens.method.scoring as scoring
from cnt_lens import NeuronPatch, measure, score
from cnt_lens.core.files import append_jsonl
from cnt_lens.method.config import TransferConfig, override
from cnt_lens.method.resume import active_directory, resumable, weights_digest
from cnt_lens.models import read_neurons, write_neurons
from cnt_lens.workflow.pipeline import transfer
from cnt_lens.workflow.testing import EstimatedMarker, MarkerBehaviour, planted_pair


def _transfer(pair, behaviour, config, out):
    """A transfer remembered in ``out/resume`` (what ``run_transfer`` opens around it)."""
    with resumable(out):
        return transfer(pair, behaviour, config, progress=False)


CFG = override(TransferConfig(), {"baselines.methods": ("attribution", "random"), "search.alphas": (1.0, 2.0), "search.max_fraction": 0.5, "baselines.random_seeds": 2})


class Stop(Exception):
    """Stands for a kill in the middle of a run."""


def _counting(monkeypatch, behaviour, stop_after: int | None = None) -> collections.Counter:
    """Count the behaviour's evaluations and estimates and the scoring passes; raise :class:`Stop` past ``stop_after``."""
    calls: collections.Counter = collections.Counter()
    cls = type(behaviour)
    for name in ("evaluate_items", "estimate_items"):
        def wrapped(self, *args, _original=getattr(cls, name), _name=name, **kwargs):
            if stop_after is not None and calls["evaluate_items"] + calls["estimate_items"] >= stop_after:
                raise Stop
            calls[_name] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(cls, name, wrapped)
    original_score = scoring._score

    def counted(*args, **kwargs):
        calls["score"] += 1
        return original_score(*args, **kwargs)

    monkeypatch.setattr(scoring, "_score", counted)
    return calls


def _numbers(report) -> dict:
    out = report.to_dict()
    out["extra"] = {k: v for k, v in out["extra"].items() if k != "wall_time_s"}
    return out


def test_a_rerun_of_a_finished_transfer_computes_nothing_and_reports_the_same(tmp_path, monkeypatch):
    pair, _, _ = planted_pair("llama", n_planted=8, seed=2)
    behaviour = EstimatedMarker()
    calls = _counting(monkeypatch, behaviour)
    first = _transfer(pair, behaviour, CFG, tmp_path).report
    assert calls["evaluate_items"] and calls["estimate_items"] and calls["score"] == 4  # 3 methods + 1 more seed
    calls.clear()
    again = _transfer(pair, behaviour, CFG, tmp_path).report
    assert sum(calls.values()) == 0
    assert _numbers(again) == _numbers(first)
    # one more baseline: only its scoring and its own points are computed
    more = override(CFG, {"baselines.methods": ("attribution", "random", "weight_diff")})
    third = _transfer(pair, behaviour, more, tmp_path).report
    assert calls["score"] == 1 and calls["evaluate_items"] >= 1
    assert third.baselines[:2] == first.baselines and third.patched == first.patched


def test_a_new_run_of_the_same_pair_reuses_only_the_donors_and_targets_evaluations(tmp_path, monkeypatch):
    from cnt_lens.method.resume import code_digest

    monkeypatch.setenv("CNT_LENS_SHARED", "1")
    monkeypatch.setenv("CNT_LENS_CACHE", str(tmp_path / "cache"))
    pair, _, _ = planted_pair("llama", n_planted=8, seed=2)
    behaviour = EstimatedMarker()
    calls = _counting(monkeypatch, behaviour)
    first = _transfer(pair, behaviour, CFG, tmp_path / "a").report
    total = calls["evaluate_items"] + calls["estimate_items"]
    kept = list((tmp_path / "cache" / "measured").glob("*.json"))
    # donor and target: validation and test evaluated, validation estimated (the screen's reference)
    assert len(kept) == 6
    calls.clear()
    second = _transfer(pair, behaviour, CFG, tmp_path / "b").report
    assert calls["evaluate_items"] + calls["estimate_items"] == total - len(kept)  # every patched point again
    assert _numbers(second) == _numbers(first)
    # another code revision measures them again
    monkeypatch.setattr("cnt_lens.method.resume.code_digest", lambda: code_digest() + "x")
    calls.clear()
    _transfer(pair, behaviour, CFG, tmp_path / "c")
    assert calls["evaluate_items"] + calls["estimate_items"] == total
    # with the cache off, everything is measured again
    monkeypatch.setenv("CNT_LENS_SHARED", "0")
    calls.clear()
    _transfer(pair, behaviour, CFG, tmp_path / "d")
    assert calls["evaluate_items"] + calls["estimate_items"] == total


def test_an_interrupted_transfer_continues_where_it_stopped_and_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    pair, _, _ = planted_pair("llama", n_planted=8, seed=2)
    behaviour = EstimatedMarker()
    calls = _counting(monkeypatch, behaviour)
    cfg = override(TransferConfig(), {"baselines.methods": ("random",), "search.alphas": (1.0, 2.0), "search.max_fraction": 0.5, "baselines.random_seeds": 2})
    whole_result = _transfer(pair, behaviour, cfg, tmp_path / "whole")
    whole = whole_result.report
    total = calls["evaluate_items"] + calls["estimate_items"]
    monkeypatch.undo()

    calls = _counting(monkeypatch, behaviour, stop_after=total // 2)
    with pytest.raises(Stop):
        _transfer(pair, behaviour, cfg, tmp_path / "cut")
    assert not (tmp_path / "cut" / "metrics.json").exists()
    done = calls["evaluate_items"] + calls["estimate_items"]
    assert done == total // 2
    monkeypatch.undo()

    calls = _counting(monkeypatch, behaviour)
    resumed_result = _transfer(pair, behaviour, cfg, tmp_path / "cut")
    resumed = resumed_result.report
    assert calls["evaluate_items"] + calls["estimate_items"] == total - done
    assert _numbers(resumed) == _numbers(whole)
    assert resumed_result.items == whole_result.items


def test_results_are_keyed_by_the_models_weights_and_patches(tmp_path, monkeypatch):
    pair, behaviour, planted = planted_pair("llama", n_planted=8, seed=2)
    calls = _counting(monkeypatch, behaviour)
    patch = NeuronPatch.from_pair(pair, planted, 1.0)
    with resumable(tmp_path) as folder:
        assert active_directory() == folder == tmp_path / "resume"
        plain = measure(pair.target, [behaviour], "validation")
        with patch.applied(pair.target):
            patched = measure(pair.target, [behaviour], "validation")
        assert measure(pair.target, [behaviour], "validation") == plain
        assert calls["evaluate_items"] == 2 and patched != plain  # the patched model is measured, not recalled
        with patch.applied(pair.target):
            assert measure(pair.target, [behaviour], "validation") == patched
        assert calls["evaluate_items"] == 2
        measure(pair.target, [behaviour], "validation", batch_size=3)  # another batch size is another result
        assert calls["evaluate_items"] == 3
        kept: list = []  # a behaviour whose decided records are whole ones answers ``items`` with them
        assert behaviour.decided_is_evaluation
        assert measure(pair.target, [behaviour], "validation", items=kept) == plain and kept
        assert calls["evaluate_items"] == 3
        cut = CutAtVerdict()
        assert not cut.decided_is_evaluation
        measure(pair.target, [cut], "validation")
        kept = []  # records kept whole (``items``) are never answered with ones cut at their verdicts
        measure(pair.target, [cut], "validation", items=kept)
        assert calls["evaluate_items"] == 5 and kept and all(r["response"] for r in kept)
        measure(pair.target, [cut], "validation", items=[])
        assert calls["evaluate_items"] == 5
    assert active_directory() is None
    measure(pair.target, [behaviour], "validation")  # outside the block: computed
    assert calls["evaluate_items"] == 6
    # a model first seen with a patch applied is never remembered: its unpatched weights are unknown
    other, behaviour2, planted2 = planted_pair("llama", n_planted=8, seed=3)
    with resumable(tmp_path), NeuronPatch.from_pair(other, planted2, 1.0).applied(other.target):
        measure(other.target, [behaviour2], "validation")
        measure(other.target, [behaviour2], "validation")
    assert calls["evaluate_items"] == 8


@dataclass(repr=False)
class CutAtVerdict(MarkerBehaviour):
    """A marker whose decided records end early (emptied responses), as refusal's end at their verdicts."""

    def decided_items(self, model, split, *, batch_size=16, progress=True):
        recs = self.evaluate_items(model, split, batch_size=batch_size, progress=progress)
        return [{**r, "response": ""} for r in recs]


def test_an_estimate_that_is_the_evaluation_is_measured_once(tmp_path, monkeypatch):
    pair, behaviour, _ = planted_pair("llama", n_planted=8, seed=2)
    calls: collections.Counter = collections.Counter()
    for cls, name in ((MarkerBehaviour, "evaluate_items"), (EstimatedMarker, "estimate_items")):
        def wrapped(self, *args, _original=getattr(cls, name), _name=name, **kwargs):
            calls[f"{type(self).__name__}.{_name}"] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(cls, name, wrapped)
    estimated = EstimatedMarker(margin=8.0)
    assert behaviour.estimate_is_evaluation and not estimated.estimate_is_evaluation
    with resumable(tmp_path):
        first = measure(pair.target, [behaviour], "validation", estimate=True)
        assert measure(pair.target, [behaviour], "validation") == first
        assert calls["MarkerBehaviour.evaluate_items"] == 1  # the estimate was the evaluation, remembered as one
        guess = measure(pair.target, [estimated], "validation", estimate=True)
        full = measure(pair.target, [estimated], "validation")
        assert calls["EstimatedMarker.estimate_items"] == calls["EstimatedMarker.evaluate_items"] == 1
        assert guess != full  # a real estimate is never taken for the evaluation


def test_one_changed_weight_changes_the_digest_and_the_scores_are_recomputed(tmp_path, monkeypatch):
    pair, behaviour, planted = planted_pair("llama", n_planted=8, seed=2)
    calls = _counting(monkeypatch, behaviour)
    before = weights_digest(pair.target)
    assert weights_digest(pair.target) == before
    with resumable(tmp_path):
        first = score(pair, behaviour, "attribution", progress=False)
        assert torch.equal(score(pair, behaviour, "attribution", progress=False).values, first.values)
        assert calls["score"] == 1
    layer, neuron = planted.mask.nonzero()[0].tolist()
    row = read_neurons(pair.target, layer, torch.tensor([neuron]))
    write_neurons(pair.target, layer, torch.tensor([neuron]), {**row, "W_out": row["W_out"] * 1.5})
    assert weights_digest(pair.target) != before
    with resumable(tmp_path):  # a new store: the model is digested afresh
        changed = score(pair, behaviour, "attribution", progress=False)
    assert calls["score"] == 2 and not torch.equal(changed.values, first.values)


def test_a_line_cut_short_by_a_kill_is_computed_again(tmp_path, monkeypatch):
    pair, behaviour, _ = planted_pair("llama", n_planted=8, seed=2)
    calls = _counting(monkeypatch, behaviour)
    with resumable(tmp_path):
        a = measure(pair.target, [behaviour], "validation")
        b = measure(pair.donor, [behaviour], "validation")
    log = tmp_path / "resume" / "measured.jsonl"
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["records"] for line in lines)
    log.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # the kill came while writing the donor's
    with resumable(tmp_path):
        assert measure(pair.target, [behaviour], "validation") == a
        assert measure(pair.donor, [behaviour], "validation") == b
    assert calls["evaluate_items"] == 3


def test_append_jsonl_adds_one_line_per_row_and_writes_nothing_for_a_row_json_cannot_hold(tmp_path):
    log = tmp_path / "deeper" / "points.jsonl"
    first = append_jsonl(log, {"k": 3, "rate": torch.tensor(0.5)})  # a tensor scalar goes through float
    append_jsonl(log, {"k": 4})
    with pytest.raises(TypeError):
        append_jsonl(log, {"k": object()})
    assert [json.loads(x) for x in log.read_text().splitlines()] == [{"k": 3, "rate": 0.5}, {"k": 4}]
    assert json.loads(first) == {"k": 3, "rate": 0.5}
