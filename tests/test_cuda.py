"""The library on a CUDA device: same scores, same patches, same search as on CPU.

These run only where ``torch.cuda.is_available()``; elsewhere the conftest deselects them and says
so in pytest's header (CI has no GPU). Run them on a GPU machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

from cnt_lens import METHODS, NeuronPatch, Utility, score, search_minimal
from cnt_lens.method.config import SearchConfig
from cnt_lens.models import device_of, hf_state_dict
from cnt_lens.workflow.testing import planted_pair

pytestmark = pytest.mark.cuda

# activation_contrast etc. read one model; patching ranks candidates only. All of them must agree.
_COMPARED = [m for m in METHODS if m != "random"]


def _on(pair, device):
    pair.donor.to(device)
    pair.target.to(device)
    return pair


@pytest.mark.parametrize("method", _COMPARED)
def test_scores_on_cuda_match_cpu(arch, method):
    pair, behaviour, planted = planted_pair(arch, n_planted=6, seed=0)
    kwargs = {"utility": Utility()} if method in ("wanda", "snip") else {}
    if "patching" in method:
        kwargs["candidates"] = planted
    cpu = score(pair, behaviour, method, progress=False, **kwargs)
    gpu = score(pair.to("cuda"), behaviour, method, progress=False, **kwargs)
    assert device_of(pair.target).type == "cuda" and device_of(pair.donor).type == "cuda"
    assert gpu.values.device.type == "cpu"  # scores come back as CPU tensors, whatever the device
    finite = cpu.values.isfinite()
    assert torch.equal(finite, gpu.values.isfinite())
    torch.testing.assert_close(gpu.values[finite], cpu.values[finite], rtol=1e-3, atol=1e-5)


def test_patch_made_on_cuda_applies_on_cpu_and_back(arch, tmp_path):
    pair, behaviour, planted = planted_pair(arch, n_planted=6, seed=0)
    cpu_patch = NeuronPatch.from_pair(pair, planted, 2.0)
    cpu_patch.apply(pair.target)
    want = {k: v.clone() for k, v in hf_state_dict(pair.target).items()}
    cpu_patch.revert(pair.target)
    original = {k: v.clone() for k, v in hf_state_dict(pair.target).items()}

    _on(pair, "cuda")
    patch = NeuronPatch.from_pair(pair, planted, 2.0)
    patch.apply(pair.target)
    got = hf_state_dict(pair.target)
    assert all(torch.allclose(got[k].cpu(), want[k], atol=1e-6) for k in want)
    patch.revert(pair.target)
    assert all(torch.equal(v.cpu(), original[k]) for k, v in hf_state_dict(pair.target).items())

    patch.save(tmp_path / "p.safetensors")  # saved from CUDA, loaded onto the CPU model
    _on(pair, "cpu")
    loaded = NeuronPatch.load(tmp_path / "p.safetensors", pair.target)
    loaded.apply(pair.target)
    assert all(torch.allclose(v, want[k], atol=1e-6) for k, v in hf_state_dict(pair.target).items())
    loaded.revert(pair.target)
    assert all(torch.equal(v, original[k]) for k, v in hf_state_dict(pair.target).items())


def test_search_on_cuda_finds_the_planted_set(arch):
    pair, behaviour, planted = planted_pair(arch, n_planted=8, seed=0)
    _on(pair, "cuda")
    s = score(pair, behaviour, progress=False)
    res = search_minimal(pair, behaviour, s, SearchConfig(goal=0.9, alphas=(1.0, 2.0), max_fraction=0.5), progress=False)
    assert res.found and res.selection.n <= planted.n
    assert res.selection.overlap(planted) >= 0.75


def test_recipe_trains_on_cuda(tmp_path, monkeypatch):
    from cnt_lens import Refusal
    from cnt_lens.experiments.recipes import TuneConfig, safety_tune
    from cnt_lens.workflow.testing import tiny_model

    monkeypatch.setenv("CNT_LENS_CACHE", str(tmp_path))
    model = tiny_model("llama", seed=0)
    model.to("cuda")
    beh = Refusal(max_new_tokens=4)
    before = beh.mean_metric(model, "validation")
    tuned = safety_tune(model, refusals=("Sorry , I cannot help with that .",),
                        config=TuneConfig(steps=60, batch_size=16, lr=1e-2, max_new_tokens=6))
    assert device_of(tuned).type == "cuda"
    assert beh.mean_metric(tuned, "validation") > before + 1.0


def test_a_target_split_between_the_gpu_and_cpu_offload_scores_patches_and_generates_like_the_whole_one(tmp_path):
    from cnt_lens import ModelPair, export_hf, generate, load_model

    pair, behaviour, planted = planted_pair("llama", n_planted=6, seed=0, layers=[0, 1])
    cpu_scores = score(pair, behaviour, "weight_attribution", progress=False)
    placement = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
                 "model.norm": 0, "lm_head": 0}  # layer 1 kept in host memory, loaded onto the GPU per forward
    split = load_model(export_hf(pair.target, tmp_path / "target"), device_map=placement)
    assert split.blocks[1].mlp.original_component.up_proj.weight.is_meta
    spread = ModelPair(donor=pair.donor.to("cuda"), target=split)
    torch.testing.assert_close(score(spread, behaviour, "weight_attribution", progress=False).values,
                               cpu_scores.values, rtol=1e-3, atol=1e-5)
    patch = NeuronPatch.from_pair(spread, planted)
    prompts = ["the quick brown fox", "one two"]
    before = generate(split, prompts, max_new_tokens=6, progress=False)
    with patch.applied(split):
        assert behaviour.evaluate(split, None, progress=False)["marker_rate"] == 1.0
    assert generate(split, prompts, max_new_tokens=6, progress=False) == before
    assert behaviour.evaluate(split, None, progress=False)["marker_rate"] == 0.0
