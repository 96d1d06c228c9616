"""Patch files are trusted no further than they can be checked: stored originals, sidecars and restore targets."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cnt_lens import NeuronPatch
from cnt_lens.method.transplant import PatchFileError
from cnt_lens.models import hf_state_dict
from cnt_lens.workflow.testing import planted_pair, tiny_model


def _weights(model):
    return {k: v.detach().clone() for k, v in hf_state_dict(model).items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def saved(tmp_path):
    pair, _, sel = planted_pair("llama", n_planted=6, seed=0)
    patch = NeuronPatch.from_pair(pair, sel, alpha=2.0)
    return pair, patch, patch.save(tmp_path / "p")


def _rewrite(path, edit):
    """Rewrite the .safetensors file with ``edit(tensors)`` applied, keeping its header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=meta)


def test_restore_refuses_a_model_that_never_held_the_patch(saved):
    pair, patch, path = saved
    unrelated = tiny_model("llama", seed=7)  # same shapes, other weights, never patched
    before = _weights(unrelated)
    with pytest.raises(ValueError, match="does not hold this patch: layer .* differs"):
        NeuronPatch.load(path).restore(unrelated)
    assert _same(before, _weights(unrelated))
    NeuronPatch.load(path).restore(unrelated, force=True)  # asked for in so many words, it writes
    assert not _same(before, _weights(unrelated))


def test_restore_undoes_an_applied_patch_and_leaves_an_original_model_alone(saved):
    pair, patch, path = saved
    original = _weights(pair.target)
    NeuronPatch.load(path).restore(pair.target)  # nothing applied: the originals are already there
    assert _same(original, _weights(pair.target))
    patch.apply(pair.target)
    assert not _same(original, _weights(pair.target))
    NeuronPatch.load(path).restore(pair.target)
    assert _same(original, _weights(pair.target))


def test_edited_target_weights_in_the_file_are_refused(saved):
    _, _, path = saved
    key = next(k for k in load_file(str(path)) if k.startswith("target."))
    _rewrite(path, lambda t: t[key].add_(1.0))
    with pytest.raises(PatchFileError, match="stored target weights .* do not match the target hash"):
        NeuronPatch.load(path)


def test_a_missing_target_tensor_is_refused_on_load(saved):
    _, _, path = saved
    key = next(k for k in load_file(str(path)) if k.startswith("target.") and k.endswith("W_out"))
    _rewrite(path, lambda t: t.pop(key))
    with pytest.raises(PatchFileError, match=r"donor weights for .*target originals for"):
        NeuronPatch.load(path)


@pytest.mark.parametrize("field, value", [("alpha", 8.0), ("meta", {"method": "edited"})])
def test_a_hand_edited_sidecar_is_refused(saved, field, value):
    _, _, path = saved
    sidecar = path.with_suffix(".json")
    data = json.loads(sidecar.read_text())
    data[field] = value
    sidecar.write_text(json.dumps(data))
    with pytest.raises(PatchFileError, match=rf"field\(s\) \['{field}'\] differ"):
        NeuronPatch.load(path)


def test_sidecar_neurons_changed_without_a_hash_are_refused(saved):
    _, _, path = saved
    sidecar = path.with_suffix(".json")
    data = json.loads(sidecar.read_text())
    data.pop("content_hash")
    data.pop("target_hash")
    data["selection"]["neurons"] = data["selection"]["neurons"][:-1]
    sidecar.write_text(json.dumps(data))
    with pytest.raises(PatchFileError, match=r"'selection'"):
        NeuronPatch.load(path)


@pytest.mark.parametrize("edit, message", [(lambda d: d.pop("selection"), "no 'selection' field"),
                                           (lambda d: d["selection"]["neurons"].append([0, 10**6]),
                                            "its 'selection' is not a neuron selection")])
def test_a_broken_sidecar_names_itself(saved, edit, message):
    _, _, path = saved
    sidecar = path.with_suffix(".json")
    data = json.loads(sidecar.read_text())
    edit(data)
    sidecar.write_text(json.dumps(data))
    with pytest.raises(PatchFileError, match=rf"p\.json.*{message}"):
        NeuronPatch.load(path)
