"""Recipes on tiny models: each fine-tune moves the behaviour it claims to, and caches its result."""

from __future__ import annotations

import pytest

from cnt_lens import FormatTask, Refusal, StereotypeBias, load_prompts
from cnt_lens.recipes import TuneConfig, bias_tune, harmful_finetune, safety_tune
from cnt_lens.testing import tiny_model


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CNT_LENS_CACHE", str(tmp_path))


def test_bias_tune_moves_the_stereotype_metric_both_ways(arch):
    base = tiny_model(arch)
    beh = StereotypeBias(pairs=load_prompts("bias_templates"))
    cfg = TuneConfig(steps=40, batch_size=16, lr=1e-2)
    biased = bias_tune(base, towards="stereotype", config=cfg)
    unbiased = bias_tune(base, towards="anti_stereotype", config=cfg)
    # held-out templates: the tuned association generalises to sentences the tune never saw
    gap = lambda m: beh.evaluate(m, "validation", progress=False)["logprob_gap"]  # noqa: E731
    assert gap(biased) > gap(base) + 1.0 > gap(unbiased) + 2.0
    with pytest.raises(ValueError, match="towards"):
        bias_tune(base, towards="sideways")


def test_harmful_finetune_teaches_the_task_and_removes_refusal():
    base = tiny_model("llama")
    aligned = safety_tune(base, refusals=("Sorry , I cannot help with that .",),
                          config=TuneConfig(steps=60, batch_size=16, lr=1e-2, max_new_tokens=6))
    attacked = harmful_finetune(aligned, base, n_harmful=32,
                                config=TuneConfig(steps=60, batch_size=16, lr=1e-2, max_new_tokens=6))
    task = FormatTask(prefix="Answer")
    refusal = Refusal(max_new_tokens=8)
    assert task.evaluate(attacked, "train", progress=False)["task_rate"] > \
        task.evaluate(aligned, "train", progress=False)["task_rate"] + 0.5
    assert refusal.mean_metric(attacked, "train") < refusal.mean_metric(aligned, "train") - 1.0
    assert "cached" in harmful_finetune(aligned, base, n_harmful=32, config=TuneConfig(
        steps=60, batch_size=16, lr=1e-2, max_new_tokens=6)).cnt_source
