"""Models spread over devices by ``device_map`` (transformers + accelerate): same logits, scores and patches."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cnt_lens import ModelPair, NeuronPatch, StreamedDonor, export_hf, generate, load_model, score
from cnt_lens.method.config import TransferConfig, override
from cnt_lens.models import OffloadedWeightsError, neuron_params
from cnt_lens.workflow.pipeline import transfer
from cnt_lens.workflow.testing import planted_pair


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


def test_a_disk_offloaded_layer_runs_scores_generates_and_is_patched_like_the_whole_model(tmp_path):
    pair, behaviour, planted = planted_pair("llama", n_planted=6, seed=0, layers=[0, 1])
    ckpt = export_hf(pair.target, tmp_path / "target")
    on_disk = {k: v.clone() for k, v in load_file(ckpt / "model.safetensors").items()}
    offloaded = load_model(ckpt, device_map=_split_map("disk"), offload_folder=tmp_path / "offload")
    assert offloaded.blocks[1].mlp.original_component.up_proj.weight.is_meta  # really offloaded
    batch = behaviour.batches(pair.tokenizer, None, 8)[0]
    logits = lambda m: m(batch.tokens, **batch.model_kwargs())  # noqa: E731
    torch.testing.assert_close(logits(offloaded), logits(pair.target))
    spread = ModelPair(donor=pair.donor, target=offloaded)
    torch.testing.assert_close(score(spread, behaviour, "weight_attribution", progress=False).values,
                               score(pair, behaviour, "weight_attribution", progress=False).values)
    patch = NeuronPatch.from_pair(spread, planted)
    assert patch.content_hash == NeuronPatch.from_pair(pair, planted).content_hash
    prompts = ["the quick brown fox", "one two"]
    with patch.applied(offloaded), patch.applied(pair.target):
        torch.testing.assert_close(logits(offloaded), logits(pair.target))
        assert behaviour.evaluate(offloaded, None, progress=False)["marker_rate"] == 1.0
        assert generate(offloaded, prompts, max_new_tokens=6, progress=False) == \
            generate(pair.target, prompts, max_new_tokens=6, progress=False)
        patched_logits = logits(pair.target)
        exported = export_hf(offloaded, tmp_path / "patched")
    torch.testing.assert_close(logits(load_model(exported)), patched_logits)  # the export holds the patch
    store = {p.role: p.tensor for p in neuron_params(offloaded, 1)}  # what accelerate loads layer 1 from
    assert torch.equal(store["W_in"], on_disk["model.layers.1.mlp.up_proj.weight"])  # reverted bit for bit
    assert torch.equal(store["W_out"], on_disk["model.layers.1.mlp.down_proj.weight"])
    assert all(torch.equal(v, load_file(ckpt / "model.safetensors")[k]) for k, v in on_disk.items())  # files untouched
    torch.testing.assert_close(logits(offloaded), logits(pair.target))
    with pytest.raises(ValueError, match="not both"):
        load_model(ckpt, device="cpu", device_map="auto")


def test_a_meta_tensor_without_an_offload_store_is_named(tmp_path):
    pair, _, planted = planted_pair("llama", n_planted=6, seed=0, layers=[1])
    proj = getattr(pair.target.blocks[1].mlp, "in").original_component  # the HF up_proj the bridge runs
    pair.target.__dict__.pop("_cnt_lens_params", None)
    proj.weight = torch.nn.Parameter(torch.empty_like(proj.weight, device="meta"), requires_grad=False)
    with pytest.raises(OffloadedWeightsError, match="layer 1's MLP tensor 'weight' is on the meta device"):
        NeuronPatch.from_pair(pair, planted)


def test_a_streamed_donor_with_a_disk_offloaded_target_gives_the_whole_pairs_scores_and_patch(tmp_path):
    pair, behaviour, planted = planted_pair("llama", n_planted=6, seed=0, layers=[0, 1])
    behaviour.toward = 1.0  # a streamed donor is never run: the direction is given
    offloaded = load_model(export_hf(pair.target, tmp_path / "target"), device_map=_split_map("disk"),
                           offload_folder=tmp_path / "offload")
    streamed = ModelPair(donor=StreamedDonor(export_hf(pair.donor, tmp_path / "donor"), target=offloaded),
                         target=offloaded)
    torch.testing.assert_close(score(streamed, behaviour, "weight_attribution", progress=False).values,
                               score(pair, behaviour, "weight_attribution", progress=False).values)
    patch = NeuronPatch.from_pair(streamed, planted)
    assert patch.content_hash == NeuronPatch.from_pair(pair, planted).content_hash
    with patch.applied(offloaded):
        assert behaviour.evaluate(offloaded, None, progress=False)["marker_rate"] == 1.0


def test_transfer_on_a_disk_offloaded_target_chooses_and_measures_what_the_whole_target_does(tmp_path):
    pair, behaviour, _ = planted_pair("llama", n_planted=6, seed=0, layers=[0, 1])
    offloaded = load_model(export_hf(pair.target, tmp_path / "target"), device_map=_split_map("disk"),
                           offload_folder=tmp_path / "offload")
    cfg = override(TransferConfig(), {"baselines.methods": ("attribution", "random"), "search.alphas": (1.0, 2.0), "search.max_fraction": 0.5})
    whole = transfer(pair, behaviour, config=cfg, progress=False)
    spread = transfer(ModelPair(donor=pair.donor, target=offloaded), behaviour, config=cfg, progress=False)
    assert spread.patch.content_hash == whole.patch.content_hash  # same neurons, same alpha, same weights
    for key in ("patched", "target", "donor"):
        assert getattr(spread.report, key)["marker_rate"] == getattr(whole.report, key)["marker_rate"]
    assert [b["marker_rate"] for b in spread.report.baselines] == [b["marker_rate"] for b in whole.report.baselines]
