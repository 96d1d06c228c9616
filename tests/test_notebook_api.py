"""What a notebook user meets: one-line reprs, patch equality, and selections as TransformerLens hooks."""

from __future__ import annotations

import pytest
import torch

from cnt_lens import NeuronPatch, NeuronSelection, Refusal, StereotypeBias, Utility, score
from cnt_lens.method.evaluate import Report
from cnt_lens.models import clone_model, neuron_params
from cnt_lens.workflow.testing import planted_pair


@pytest.fixture(scope="module")
def planted():
    return planted_pair("llama", n_planted=6, seed=0)


def _one_line(obj) -> str:
    text = repr(obj)
    assert "\n" not in text and len(text) < 320, text
    return text


def test_reprs_are_one_line_and_say_what_matters(planted, tmp_path):
    pair, behaviour, sel = planted
    assert _one_line(Refusal()).startswith("Refusal(harmful=") and "harmless=" in repr(Refusal())
    assert "max_new_tokens=8" in _one_line(Refusal(max_new_tokens=8))  # a changed setting shows
    _one_line(Utility()), _one_line(StereotypeBias()), _one_line(behaviour)
    assert "n_layers=2" in _one_line(pair) and "d_mlp=48" in repr(pair)
    patch = NeuronPatch.from_pair(pair, sel, 2.0)
    assert "n=6" in _one_line(patch) and "alpha=2" in repr(patch) and patch.content_hash[:12] in repr(patch)
    scores = score(pair, behaviour, "weight_attribution", split="train", progress=False)
    assert "'weight_attribution'" in _one_line(scores) and "shape=(2, 48)" in repr(scores)
    report = Report("refusal", "test", 96, donor={"refusal_harmful": 0.9, "refusal_harmful_ci95": [0.8, 0.95]},
                    target={"refusal_harmful": 0.1, "refusal_harmful_ci95": [0.05, 0.2]},
                    patched={"n_neurons": 6, "alpha": 2.0, "refusal_harmful": 0.7, "refusal_harmful_ci95": [0.6, 0.8]},
                    baselines=[{"method": "random"}])
    text = _one_line(report)
    assert "6 neurons at alpha 2.0" in text and "patched 0.7" in text and "'random'" in text


def test_patches_are_equal_when_they_write_the_same_thing(planted, tmp_path):
    pair, _, sel = planted
    patch = NeuronPatch.from_pair(pair, sel, 2.0)
    assert patch == NeuronPatch.from_pair(pair, sel, 2.0)
    assert patch == NeuronPatch.load(patch.save(tmp_path / "p"), pair.target)
    assert patch != NeuronPatch.from_pair(pair, sel, 1.0)
    fewer = NeuronSelection.from_indices(sel.indices()[:-1], *sel.shape)
    assert patch != NeuronPatch.from_pair(pair, fewer, 2.0) and patch != "a patch"


def _run(model, tokens, hooks):
    """Logits with ``hooks``, and each hooked activation as the next hook on the same point sees it."""
    seen = {}
    record = [(name, lambda x, hook, name=name: seen.__setitem__(name, x.detach().clone())) for name, _ in hooks]
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks + record)
    return logits, seen


def test_selection_hooks_ablate_in_activation_space_what_zeroed_weights_remove(planted):
    pair, behaviour, sel = planted
    tokens = behaviour.batches(pair.tokenizer, "test", 8)[0].tokens
    donor = pair.donor  # where the planted neurons fire
    hooked, seen = _run(donor, tokens, sel.hooks("zero"))
    for name, act in seen.items():
        layer = int(name.split(".")[1])
        assert (act[..., sel.layer_indices(layer)] == 0).all()
    # zeroing a neuron's activation removes exactly what its output weights write
    zeroed = clone_model(donor)
    with torch.no_grad():
        for layer, n in sel.indices():
            for p in neuron_params(zeroed, layer):
                if p.role == "W_out":
                    p.tensor.select(p.axis, n).zero_()
        by_weights = zeroed(tokens)
        clean = donor(tokens)
    torch.testing.assert_close(hooked, by_weights, atol=1e-5, rtol=1e-4)
    assert (hooked - clean).abs().max() > 1e-3  # the planted neurons matter


def test_selection_hooks_patch_scale_and_mean(planted):
    pair, behaviour, sel = planted
    tokens = behaviour.batches(pair.tokenizer, "test", 8)[0].tokens
    with torch.no_grad():
        _, donor_cache = pair.donor.run_with_cache(tokens)
        clean, target_cache = pair.target.run_with_cache(tokens)
    own, _ = _run(pair.target, tokens, sel.hooks("patch", values=target_cache))
    torch.testing.assert_close(own, clean)  # the target's own activations change nothing
    _, seen = _run(pair.target, tokens, sel.hooks("patch", values=donor_cache))
    for name, act in seen.items():
        idx = sel.layer_indices(int(name.split(".")[1]))
        torch.testing.assert_close(act[..., idx], donor_cache[name][..., idx])
    _, doubled = _run(pair.target, tokens, sel.hooks("scale", factor=2.0))
    first = min(seen)  # the first hooked layer sees the clean residual stream
    idx = sel.layer_indices(int(first.split(".")[1]))
    torch.testing.assert_close(doubled[first][..., idx], 2 * target_cache[first][..., idx])
    means = torch.full(sel.shape, 0.5)
    _, set_to = _run(pair.target, tokens, sel.hooks("mean", values=means))
    assert all((act[..., sel.layer_indices(int(n.split(".")[1]))] == 0.5).all() for n, act in set_to.items())
    with pytest.raises(ValueError, match="needs values="):
        sel.hooks("patch")
    with pytest.raises(ValueError, match="mode must be one of"):
        sel.hooks("resample")
    with pytest.raises(ValueError, match="mean values are"):
        sel.hooks("mean", values=torch.zeros(3, 3))
