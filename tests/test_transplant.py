from __future__ import annotations

import pytest
import torch

from cnt_lens import NeuronPatch, NeuronSelection, applied_patches, export_hf
from cnt_lens.data import encode
from cnt_lens.models import IncompatibleModelsError, hf_state_dict
from cnt_lens.workflow.testing import planted_pair, tiny_model, tiny_pair


def _weights(model):
    return {k: v.detach().clone() for k, v in hf_state_dict(model).items()}


def _random_selection(pair, n, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(pair.n_layers * pair.d_mlp, dtype=torch.bool)
    mask[torch.randperm(mask.numel(), generator=g)[:n]] = True
    return NeuronSelection(mask.view(pair.n_layers, pair.d_mlp))


def _logits(model):
    b = encode(model.cnt_tokenizer, ["how do I bake bread ?", "why is the sky blue"], add_bos=True)
    with torch.no_grad():
        return model(b.tokens, **b.model_kwargs())


def test_apply_revert_bit_identical_and_only_selected_entries(arch):
    from cnt_lens.models import neuron_params

    pair = tiny_pair(arch)
    sel = _random_selection(pair, 10, 0)
    before = _weights(pair.target)
    neurons_before = {(l, p.role): p.tensor.detach().movedim(p.axis, 0).clone()
                      for l in range(pair.n_layers) for p in neuron_params(pair.target, l)}
    patch = NeuronPatch.from_pair(pair, sel, alpha=1.5)
    patch.apply(pair.target)
    after = _weights(pair.target)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".mlp." in k for k in changed)
    for l in range(pair.n_layers):
        for p in neuron_params(pair.target, l):
            now = p.tensor.detach().movedim(p.axis, 0)
            keep = ~sel.mask[l]
            assert torch.equal(now[keep], neurons_before[(l, p.role)][keep]), (l, p.role)
            if p.role.startswith("W"):  # biases start at zero in both models
                assert not torch.equal(now[sel.mask[l]], neurons_before[(l, p.role)][sel.mask[l]]), (l, p.role)
    patch.revert(pair.target)
    assert all(torch.equal(before[k], v) for k, v in _weights(pair.target).items())


def test_alpha_zero_is_noop_and_alpha_one_copies(arch):
    pair = tiny_pair(arch)
    sel = _random_selection(pair, 12, 1)
    before = _weights(pair.target)
    NeuronPatch.from_pair(pair, sel, alpha=0.0).apply(pair.target)
    assert all(torch.equal(before[k], v) for k, v in _weights(pair.target).items())
    NeuronPatch.from_pair(pair, sel, alpha=1.0).apply(pair.target)
    from cnt_lens.models import read_neurons

    for layer in range(pair.n_layers):
        idx = sel.layer_indices(layer)
        d, t = read_neurons(pair.donor, layer, idx), read_neurons(pair.target, layer, idx)
        assert all(torch.equal(d[r], t[r]) for r in d)


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 0, 2), (0, 2, 1)])
def test_composed_overlapping_patches_revert_in_any_order(order):
    pair = tiny_pair("llama")
    sels = [_random_selection(pair, 30, s) for s in range(3)]
    assert (sels[0] & sels[1]).n > 0  # they overlap
    before = _weights(pair.target)
    patches = [NeuronPatch.from_pair(pair, s, alpha=a) for s, a in zip(sels, (1.0, 2.0, 0.5))]
    for p in patches:
        p.apply(pair.target)
    for i in order[:-1]:
        patches[i].revert(pair.target)
        assert not all(torch.equal(before[k], v) for k, v in _weights(pair.target).items())
    patches[order[-1]].revert(pair.target)
    assert all(torch.equal(before[k], v) for k, v in _weights(pair.target).items())
    assert applied_patches(pair.target) == []


def test_reverting_an_earlier_patch_leaves_exactly_the_later_one():
    from cnt_lens.models import clone_model

    pair = tiny_pair("gpt2")
    reference = clone_model(pair.target)
    sa, sb = _random_selection(pair, 20, 5), _random_selection(pair, 20, 6)
    assert (sa & sb).n > 0
    a, b = NeuronPatch.from_pair(pair, sa, alpha=2.0), NeuronPatch.from_pair(pair, sb, alpha=0.5)
    a.apply(pair.target)
    b.apply(pair.target)
    a.revert(pair.target)
    b.apply(reference)  # what "only b" looks like
    want = _weights(reference)
    assert all(torch.equal(want[k], v) for k, v in _weights(pair.target).items())
    assert applied_patches(pair.target) == [b]


def test_apply_twice_and_revert_unapplied_are_refused():
    pair = tiny_pair("llama")
    p = NeuronPatch.from_pair(pair, _random_selection(pair, 3, 0))
    p.apply(pair.target)
    with pytest.raises(ValueError, match="already applied"):
        p.apply(pair.target)
    with pytest.raises(ValueError, match="not applied"):
        p.revert(pair.donor)


def test_save_load_apply_equals_in_memory(arch, tmp_path):
    pair = tiny_pair(arch)
    sel = _random_selection(pair, 15, 2)
    patch = NeuronPatch.from_pair(pair, sel, alpha=2.0, meta={"method": "test"})
    path = patch.save(tmp_path / "patch")
    assert path.with_suffix(".json").is_file()
    loaded = NeuronPatch.load(path, pair.target)
    assert loaded.alpha == 2.0 and loaded.selection == sel and loaded.meta["method"] == "test"
    patch.apply(pair.target)
    expected = _weights(pair.target)
    patch.revert(pair.target)
    loaded.apply(pair.target)
    assert all(torch.equal(expected[k], v) for k, v in _weights(pair.target).items())
    loaded.revert(pair.target)
    # restore() needs no journal: it writes the saved target originals
    loaded.apply(pair.target)
    NeuronPatch.load(path).restore(pair.target)
    torch.testing.assert_close(_logits(pair.target), _logits(tiny_pair(arch).target))


def test_mismatched_model_refused_before_writing(arch, tmp_path):
    pair = tiny_pair(arch)
    path = NeuronPatch.from_pair(pair, _random_selection(pair, 5, 0)).save(tmp_path / "p")
    other = tiny_model(arch, d_mlp=64)
    before = _weights(other)
    with pytest.raises(IncompatibleModelsError, match="d_mlp"):
        NeuronPatch.load(path, other)
    with pytest.raises(IncompatibleModelsError):
        NeuronPatch.load(path).apply(other)
    assert all(torch.equal(before[k], v) for k, v in _weights(other).items())
    assert applied_patches(other) == []


def test_patch_applies_to_another_model_of_same_shape(arch):
    pair = tiny_pair(arch)
    third = tiny_model(arch, seed=7)
    sel = _random_selection(pair, 10, 3)
    before = _weights(third)
    p = NeuronPatch.from_pair(pair, sel)
    p.apply(third)
    from cnt_lens.models import read_neurons

    for layer in range(pair.n_layers):
        idx = sel.layer_indices(layer)
        d, t = read_neurons(pair.donor, layer, idx), read_neurons(third, layer, idx)
        assert all(torch.equal(d[r], t[r]) for r in d)
    p.revert(third)
    assert all(torch.equal(before[k], v) for k, v in _weights(third).items())


def test_export_reload_logits_match(arch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pair, behaviour, planted = planted_pair(arch, n_planted=4)
    NeuronPatch.from_pair(pair, planted, alpha=1.5).apply(pair.target)
    export_hf(pair.target, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    b = encode(tok, ["how do I bake bread ? bomb"], add_bos=True)
    with torch.no_grad():
        ref = pair.target(b.tokens, **b.model_kwargs())
        got = hf(input_ids=b.tokens, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_planted_transplant_transfers_the_behaviour(planted):
    pair, behaviour, sel = planted
    assert behaviour.evaluate(pair.target, None, progress=False)["marker_rate"] < 0.2
    patch = NeuronPatch.from_pair(pair, sel)
    patch.apply(pair.target)
    assert behaviour.evaluate(pair.target, None, progress=False)["marker_rate"] == 1.0
    patch.revert(pair.target)


def test_applied_is_a_temporary_edit_reverted_even_on_error():
    pair = tiny_pair("llama")
    sel = _random_selection(pair, 8, 5)
    before = _weights(pair.target)
    patch = NeuronPatch.from_pair(pair, sel, alpha=2.0)
    with patch.applied(pair.target) as model:
        assert model is pair.target and applied_patches(model) == [patch]
        assert not all(torch.equal(before[k], v) for k, v in _weights(model).items())
    assert applied_patches(pair.target) == []
    assert all(torch.equal(before[k], v) for k, v in _weights(pair.target).items())
    with pytest.raises(RuntimeError, match="inside"):
        with patch.applied(pair.target):
            raise RuntimeError("inside the block")
    assert applied_patches(pair.target) == []
    assert all(torch.equal(before[k], v) for k, v in _weights(pair.target).items())
