from __future__ import annotations

import torch

from cnt_lens import score
from cnt_lens.show.inspector import best_in_bin, inspect, neuron_card, neuron_stats, neurons_stats
from cnt_lens.workflow.testing import MARKER, TRIGGER


def test_planted_neuron_fires_on_trigger_in_donor_only(planted):
    pair, behaviour, sel = planted
    layer, neuron = sel.indices()[0]
    s = neuron_stats(pair, layer, neuron, behaviour, split="test")
    last = s["last_token"]
    # behaviour prompts end in the trigger, controls in "cake": the donor's neuron separates them
    assert min(last["donor"]["behaviour"]) > max(last["donor"]["control"])
    assert min(last["donor"]["behaviour"]) > max(last["target"]["behaviour"])
    assert len(s["activations"]["donor"]["behaviour"]) > len(last["donor"]["behaviour"])
    top = s["top_prompts"]["donor"]
    assert all(p["set"] == "behaviour" and p["token"].strip() == TRIGGER for p in top)
    # each top prompt is shown around its peak, the peak token marked: the user's words, not the template's
    assert all(f"⟦{p['token'].strip()}⟧" in p["text"] for p in top)
    assert all(p["text"].split("⟦")[0].strip() for p in top)  # words before the peak are shown
    # the template (shared by every prompt of both sets) is left out: the planted neuron reads the trigger, which
    # the template does not hold, so its activation on the template stays below its peak on the user's words
    assert s["template_max"]["donor"] < min(p["max_activation"] for p in top)
    # its output row writes the marker: the logit lens shows it first
    assert s["logit_lens"]["donor"]["promoted"][0][0].strip() == MARKER
    assert s["weight_diff"]["W_in"]["relative_change"] > 0 and s["weight_diff"]["W_out"]["relative_change"] == 0


def test_several_neurons_in_one_pass_match_one_at_a_time(planted):
    pair, behaviour, sel = planted
    layer, neuron = sel.indices()[0]
    other = (layer + 1) % pair.n_layers
    # the planted neuron, a second neuron of its layer and one of another layer, in an order that is not sorted
    neurons = [(other, 3), (layer, neuron), (layer, (neuron + 5) % pair.d_mlp)]
    together = neurons_stats(pair, neurons, behaviour, split="test")
    assert [(s["layer"], s["neuron"]) for s in together] == neurons
    for (lay, n), s in zip(neurons, together):
        assert s == neuron_stats(pair, lay, n, behaviour, split="test")
    # the pass stops after the deepest layer asked for; the activations are those of a whole forward pass
    b = behaviour.batches(pair.tokenizer, "test", 16)[0]
    _, cache = pair.donor.run_with_cache(b.tokens, **b.model_kwargs())
    whole = cache[f"blocks.{layer}.mlp.hook_post"][:, -1, neuron]
    assert torch.allclose(torch.tensor(together[1]["last_token"]["donor"]["behaviour"][:len(whole)]), whole.float(),
                          atol=1e-5)
    # different neurons give different data: the stats are not one neuron's copied
    assert together[0]["last_token"] != together[1]["last_token"] != together[2]["last_token"]


def test_card_and_static_inspect(planted):
    pair, behaviour, sel = planted
    layer, neuron = sel.indices()[0]
    card = neuron_card(pair, layer, neuron, behaviour, split="test")
    assert sum(t.type == "violin" for t in card.data) == 4 and any(t.type == "table" for t in card.data)
    scores = score(pair, behaviour, progress=False)
    out = inspect(pair, scores, behaviour, sel, split="test")
    figs = out if isinstance(out, list) else [out.children[0]]
    assert figs[0].data[0].type == "heatmap"


def test_best_in_bin(planted):
    pair, behaviour, sel = planted
    scores = score(pair, behaviour, progress=False)
    layer, neuron = scores.top_k(1).indices()[0]
    start = (neuron // 4) * 4
    assert best_in_bin(scores, layer, start, 12) == (layer, neuron)
