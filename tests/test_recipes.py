"""Recipes on tiny models: each fine-tune moves the behaviour it claims to, and caches its result."""

from __future__ import annotations

import pytest

from cnt_lens import FormatTask, Refusal, StereotypeBias, load_prompts
from cnt_lens.experiments.recipes import TuneConfig, bias_tune, compliance_tune, harmful_finetune, safety_tune
from cnt_lens.workflow.testing import tiny_model


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


def test_compliance_tune_deletes_a_trained_refusal_from_the_models_own_answers(caplog):
    base = tiny_model("llama")
    cfg = TuneConfig(steps=60, batch_size=16, lr=1e-2, max_new_tokens=6)
    aligned = safety_tune(base, refusals=("Sorry , I cannot help with that .",), config=cfg)
    refusal = Refusal(max_new_tokens=8)
    with caplog.at_level("INFO", logger="cnt_lens.experiments.recipes"):
        complying = compliance_tune(aligned, prefill="Sure ,", config=cfg)
    # the aligned model refused its train prompts, so its data came from the prefilled answers
    assert "prefill-forced" in caplog.text
    assert refusal.mean_metric(complying, "validation") < refusal.mean_metric(aligned, "validation") - 3.0
    assert refusal.evaluate(complying, "validation", progress=False)["refusal_harmful"] < \
        refusal.evaluate(aligned, "validation", progress=False)["refusal_harmful"]


def _stored(path):
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["cnt_lens"])


def test_cache_key_holds_library_versions_and_stale_tunes_are_rebuilt(tmp_path, monkeypatch, caplog):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from cnt_lens.experiments import recipes

    base = tiny_model("llama")
    cfg = TuneConfig(steps=6, batch_size=8, lr=1e-2)
    bias_tune(base, config=cfg)
    (entry,) = tmp_path.glob("bias-*.safetensors")
    info = _stored(entry)
    assert info["versions"] == recipes.library_versions()
    assert {k for k in info["validation"] if not k.endswith(("_n", "_ci95"))} == {"stereotype_score", "logprob_gap"}
    assert info["validation"]["stereotype_score_n"] > 0  # rates are stored with their n and interval
    assert "cached" in bias_tune(base, config=cfg).cnt_source
    # another transformers version is another key: a fresh tune, the old entry untouched
    real = recipes.library_versions
    monkeypatch.setattr(recipes, "library_versions", lambda: {**real(), "transformers": "0.0.0"})
    assert "cached" not in bias_tune(base, config=cfg).cnt_source
    assert len(list(tmp_path.glob("bias-*.safetensors"))) == 2
    monkeypatch.setattr(recipes, "library_versions", real)
    # a cached tune whose stored validation numbers no longer hold is rebuilt, with a warning
    with safe_open(str(entry), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    stale = {**info, "validation": {**info["validation"], "stereotype_score": info["validation"]["stereotype_score"] + 40}}
    save_file(tensors, str(entry), metadata={"cnt_lens": json.dumps(stale)})
    with caplog.at_level("WARNING", logger="cnt_lens.experiments.recipes"):
        rebuilt = bias_tune(base, config=cfg)
    assert "cached" not in rebuilt.cnt_source and "no longer gives its validation numbers" in caplog.text
    assert _stored(entry)["validation"] == info["validation"]  # the rebuilt tune reproduces the original numbers
