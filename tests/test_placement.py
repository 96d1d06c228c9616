"""Models spread over devices by ``device_map`` (transformers + accelerate): same logits, scores and patches."""

from __future__ import annotations

import pytest
import torch

from cnt_lens import ModelPair, NeuronPatch, OffloadedWeightsError, export_hf, load_model, score
from cnt_lens.testing import planted_pair


def _split_map(offloaded: str) -> dict[str, str]:
    """Tiny Llama: everything on the CPU except layer 1, which goes to ``offloaded``."""
    return {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
            "model.layers.1": offloaded, "model.norm": "cpu", "lm_head": "cpu"}


def test_a_target_spread_by_device_map_scores_and_patches_like_the_whole_one(tmp_path):
    pair, behaviour, planted = planted_pair("llama", n_planted=6, seed=0, layers=[0])
    ckpt = export_hf(pair.target, tmp_path / "target")
    mapped = load_model(ckpt, device_map={k: "cpu" for k in _split_map("cpu")})
    spread = ModelPair(donor=pair.donor, target=mapped)
    torch.testing.assert_close(score(spread, behaviour, "weight_attribution", progress=False).values,
                               score(pair, behaviour, "weight_attribution", progress=False).values)
    patch = NeuronPatch.from_pair(spread, planted)
    before = {k: v.clone() for k, v in mapped.original_model.state_dict().items()}
    with patch.applied(mapped):
        assert behaviour.evaluate(mapped, None, progress=False)["marker_rate"] == 1.0
    after = mapped.original_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # reverted bit for bit


def test_a_disk_offloaded_layer_runs_and_scores_but_refuses_a_patch(tmp_path):
    pair, behaviour, planted = planted_pair("llama", n_planted=6, seed=0, layers=[0, 1])
    ckpt = export_hf(pair.target, tmp_path / "target")
    offloaded = load_model(ckpt, device_map=_split_map("disk"), offload_folder=tmp_path / "offload")
    batch = behaviour.batches(pair.tokenizer, None, 8)[0]
    torch.testing.assert_close(offloaded(batch.tokens, **batch.model_kwargs()),
                               pair.target(batch.tokens, **batch.model_kwargs()))
    spread = ModelPair(donor=pair.donor, target=offloaded)
    torch.testing.assert_close(score(spread, behaviour, "weight_attribution", progress=False).values,
                               score(pair, behaviour, "weight_attribution", progress=False).values)
    with pytest.raises(OffloadedWeightsError, match="layer 1's MLP weights are offloaded"):
        NeuronPatch.from_pair(spread, planted)
    with pytest.raises(ValueError, match="not both"):
        load_model(ckpt, device="cpu", device_map="auto")
