"""A donor streamed from its checkpoint files gives the same scores and patches as the loaded donor."""

from __future__ import annotations

import copy
import gc

import pytest
import torch

from cnt_lens import ModelPair, NeuronPatch, StreamedDonor, export_hf, score
from cnt_lens.method.scoring import BehaviourSignalError
from cnt_lens.models import IncompatibleModelsError, neuron_params
from cnt_lens.models.streamed import DonorForwardError
from cnt_lens.workflow.testing import planted_pair, tiny_model


def _toward(behaviour, sign):
    b = copy.copy(behaviour)
    b.toward = sign
    return b


def _layer_bytes(model, layer):
    return sum(p.tensor.numel() * p.tensor.element_size() for p in neuron_params(model, layer))


@pytest.mark.parametrize("shards", [False, True])
def test_streamed_donor_scores_and_patches_like_the_loaded_one(arch, tmp_path, shards):
    pair, behaviour, planted = planted_pair(arch, n_planted=6, seed=0, rewire_out=True)
    behaviour = _toward(behaviour, 1.0)  # the streamed donor is never run
    ckpt = tmp_path / "donor"
    export_hf(pair.donor, ckpt)
    if shards:  # a sharded checkpoint with its index, as large models ship
        hf = pair.donor.original_model
        (ckpt / "model.safetensors").unlink()
        from cnt_lens.models import fresh_hf_model

        fresh_hf_model(pair.donor).save_pretrained(ckpt, safe_serialization=True, max_shard_size="20KB")
        assert (ckpt / "model.safetensors.index.json").is_file() and len(list(ckpt.glob("*.safetensors"))) > 2
        del hf
    streamed = StreamedDonor(ckpt, target=pair.target)
    spair = ModelPair(donor=streamed, target=pair.target)

    whole = score(pair, behaviour, "weight_attribution", progress=False)
    light = score(spair, behaviour, "weight_attribution", progress=False)
    torch.testing.assert_close(light.values, whole.values, rtol=1e-4, atol=1e-6)
    assert light.top_k(planted.n).overlap(planted) == whole.top_k(planted.n).overlap(planted) == 1.0
    torch.testing.assert_close(score(spair, behaviour, "weight_diff").values, score(pair, behaviour, "weight_diff").values)

    # the patch holds the same bytes, so it is the same patch, and it transfers the behaviour
    p_whole, p_light = NeuronPatch.from_pair(pair, planted), NeuronPatch.from_pair(spair, planted)
    assert p_light.content_hash == p_whole.content_hash
    with p_light.applied(pair.target):
        assert behaviour.evaluate(pair.target, None, progress=False)["marker_rate"] == 1.0

    # never more than one donor layer alive at once
    gc.collect()
    assert 0 < streamed.peak_bytes <= max(_layer_bytes(pair.target, layer) for layer in range(pair.n_layers))
    assert streamed.resident_bytes == 0


def test_streamed_donor_says_what_it_cannot_do(tmp_path):
    pair, behaviour, _ = planted_pair("llama", n_planted=4, seed=0)
    export_hf(pair.donor, tmp_path / "donor")
    spair = ModelPair(donor=StreamedDonor(tmp_path / "donor", target=pair.target), target=pair.target)
    with pytest.raises(BehaviourSignalError, match="toward="):
        score(spair, behaviour, "weight_attribution", progress=False)
    with pytest.raises(DonorForwardError, match="weight_attribution, weight_diff"):
        score(spair, _toward(behaviour, 1.0), "attribution", progress=False)
    other = tiny_model("llama", d_mlp=64)
    with pytest.raises(IncompatibleModelsError, match="donor"):
        StreamedDonor(tmp_path / "donor", target=other)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        (tmp_path / "empty").mkdir()
        StreamedDonor(tmp_path / "empty", target=pair.target)


def test_a_fused_gate_up_projection_is_refused_by_name(tmp_path):
    phi3 = tiny_model("phi3")
    export_hf(tiny_model("phi3", seed=1), tmp_path / "donor")
    with pytest.raises(NotImplementedError, match="W_gate, W_in are views of a fused tensor"):
        StreamedDonor(tmp_path / "donor", target=phi3)
