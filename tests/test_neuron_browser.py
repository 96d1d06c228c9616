"""The neuron browser's numbers are the patched model's own, and its page holds them safely."""

from __future__ import annotations

import json
import re

import pytest
import torch

from cnt_lens import NeuronPatch, score
from cnt_lens.data import encode, load_prompts
from cnt_lens.method.selection import NeuronSelection, hook_name
from cnt_lens.show.neuron_browser import N_BINS, browser_data, texts_from_items, write_neuron_browser
from cnt_lens.workflow.testing import planted_pair


@pytest.fixture(scope="module")
def measured():
    pair, behaviour, planted = planted_pair("gpt2", n_planted=6, seed=3)
    scores = score(pair, behaviour, "weight_attribution", split="train", progress=False)
    sel = scores.top_k(6)  # the planted six: no ties among their scores
    patch = NeuronPatch.from_pair(pair, sel, 2.0)
    texts = {"trigger": [p + " </script><b>x</b>" for p in behaviour.prompts.split("test").column("prompt")[:10]]}
    return pair, behaviour, scores, patch, browser_data(pair, behaviour, patch, scores, texts=texts)


def test_rows_are_the_patch_neurons_with_their_ranks_and_bounded_weight_change(measured):
    pair, _, scores, patch, data = measured
    rows = data["neurons"]
    assert [(r["layer"], r["neuron"]) for r in rows] == patch.selection.indices()
    assert [r["rank"] for r in rows] == scores.rank_of(patch.selection).tolist()
    assert sorted(r["rank"] for r in rows) == list(range(1, 7))  # the top 6 of the ranking
    assert all(0 <= r["weight_change"] <= 2 for r in rows)
    assert data["sets"] == ["trigger", "general text"] and data["alpha"] == 2.0


def test_activations_match_an_unpadded_pass_of_the_patched_model(measured):
    pair, _, _, patch, data = measured
    corpus = load_prompts("general").column("text")
    j = 0
    layer, n = patch.selection.indices()[j]
    maxima = []
    with patch.applied(pair.target), torch.no_grad():
        for text in corpus:  # one text per pass: no padding to get wrong
            _, cache = pair.target.run_with_cache(encode(pair.tokenizer, [text]).tokens)
            maxima.append(float(cache[hook_name(layer, "hook_post")][0, 1:, n].max()))  # the first token left out
    row = data["neurons"][j]
    assert row["activation"]["general text"] == pytest.approx(sum(maxima) / len(maxima), rel=1e-4, abs=1e-5)
    top = row["examples"]["general text"][0]
    assert top["acts"][top["peak"]] == pytest.approx(max(maxima), abs=2e-3)
    for r in data["neurons"]:
        assert len(r["hist"]["edges"]) == N_BINS + 1
        assert sum(r["hist"]["counts"]["general text"]) == len(corpus)
        assert sum(r["hist"]["counts"]["trigger"]) == 10


def test_ablation_estimate_points_the_way_exact_ablation_moves_the_metric(measured):
    pair, behaviour, _, patch, data = measured
    batches = behaviour.batches(pair.tokenizer, "validation", 16)
    row = max(data["neurons"], key=lambda r: abs(r["ablation"]))
    one = NeuronSelection.from_indices([(row["layer"], row["neuron"])], *patch.selection.shape)

    def mean_metric(hooks):
        total, n = 0.0, 0
        with torch.no_grad():
            for b in batches:
                logits = pair.target.run_with_hooks(b.tokens, fwd_hooks=hooks, **b.model_kwargs())
                m = behaviour.metric(logits, b)
                total, n = total + float(m.sum()), n + m.numel()
        return total / n

    with patch.applied(pair.target):
        exact = mean_metric(one.hooks("zero")) - mean_metric([])
    assert exact != 0 and (exact > 0) == (row["ablation"] > 0)


def test_the_page_embeds_the_data_safely_and_needs_nothing_outside(measured, tmp_path):
    *_, data = measured
    page = write_neuron_browser(tmp_path, data).read_text()
    assert "</script><b>" not in page  # a text cannot close the data element
    embedded = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(embedded.replace("<\\/", "</")) == json.loads((tmp_path / "neurons.json").read_text())
    assert not re.search(r'(src|href)="https?://', page)


def test_texts_from_items_pair_each_prompt_with_the_models_answer(measured):
    pair, *_ = measured
    items = [{"model": "patched", "set": "harmful", "prompt": "How?", "response": "No."},
             {"model": "target", "set": "harmful", "prompt": "How?", "response": "Sure."},
             {"model": "patched", "set": "harmless", "prompt": "Hi", "response": "Hello!"}]
    texts = texts_from_items(items, pair.tokenizer)
    assert list(texts) == ["harmful", "harmless"]
    assert texts["harmful"][0].endswith("No.") and "How?" in texts["harmful"][0]
