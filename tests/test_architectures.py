"""The architecture matrix: every family in ``TESTED_FAMILIES``, as a tiny random HF model, through cnt_lens.

For each family: the neuron mapping is checked against the family's HF weight layout written out
here by hand (not read from cnt_lens), the activation cnt_lens computes from ``hook_in`` equals the
bridge's ``hook_post``, a planted function is found, and a patched model exports and reloads to the
same logits; greedy generation parity is ``tests/test_generation.py``'s, over the same families.
``benchmarks/architecture_matrix.py`` turns the JUnit report of both files into the family × check table.
"""

from __future__ import annotations

import re

import pytest
import torch

from cnt_lens import NeuronPatch, NeuronSelection, export_hf, load_model, score
from cnt_lens.models import TESTED_FAMILIES, ModelPair, UnsupportedModelError, hf_state_dict, mlp_hidden, neuron_params
from cnt_lens.workflow.testing import planted_pair, tiny_model, tiny_tokenizer

D_MLP = 48
_GATED = {"mlp.gate_proj.weight": 0, "mlp.up_proj.weight": 0, "mlp.down_proj.weight": 1}
LAYOUT: dict[str, dict[str, int | str]] = {
    # HF parameter name within a layer → the axis that indexes the MLP's neurons; "fused" = gate and up
    # stacked along axis 0 (neuron i owns rows i and d_mlp + i)
    **{f: _GATED for f in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "stablelm", "olmo")},
    "phi3": {"mlp.gate_up_proj.weight": "fused", "mlp.down_proj.weight": 1},
    "gpt2": {"mlp.c_fc.weight": 1, "mlp.c_fc.bias": 0, "mlp.c_proj.weight": 0},  # Conv1D: weight [in, out]
    "gpt_neox": {"mlp.dense_h_to_4h.weight": 0, "mlp.dense_h_to_4h.bias": 0, "mlp.dense_4h_to_h.weight": 1},
    "opt": {"fc1.weight": 0, "fc1.bias": 0, "fc2.weight": 1},
    "falcon": {"mlp.dense_h_to_4h.weight": 0, "mlp.dense_4h_to_h.weight": 1},
}
_LAYER_KEY = re.compile(r"\.(?:layers|h)\.(\d+)\.(.+)$")


def test_the_layout_table_covers_every_tested_family():
    assert set(LAYOUT) == set(TESTED_FAMILIES)


def _selection(n_layers: int) -> NeuronSelection:
    gen = torch.Generator().manual_seed(7)
    mask = torch.zeros(n_layers, D_MLP, dtype=torch.bool)
    for layer in range(n_layers):
        mask[layer, torch.randperm(D_MLP, generator=gen)[:5]] = True
    return NeuronSelection(mask)


def _expected(target: torch.Tensor, donor: torch.Tensor, axis: int | str, idx: torch.Tensor) -> torch.Tensor:
    if axis == "fused":
        axis, idx = 0, torch.cat([idx, idx + D_MLP])
    return target.index_copy(axis, idx, donor.index_select(axis, idx))


@pytest.mark.parametrize("family", TESTED_FAMILIES)
def test_a_patch_writes_exactly_the_selected_neurons_hf_entries(family):
    pair = ModelPair(donor=tiny_model(family, seed=1), target=tiny_model(family, seed=0))
    for model, seed in ((pair.donor, 1), (pair.target, 0)):  # HF initialises biases to zero: make them differ
        gen = torch.Generator().manual_seed(seed)
        for name, t in hf_state_dict(model).items():
            if name.endswith("bias") and t.dim() == 1:
                t.copy_(torch.randn(t.shape, generator=gen))
    assert pair.d_mlp == D_MLP  # the bridge's config may guess the width; cnt_lens reads it from the weights
    before, donor = hf_state_dict(pair.target), hf_state_dict(pair.donor)
    before = {k: v.clone() for k, v in before.items()}
    sel = _selection(pair.n_layers)
    patch = NeuronPatch.from_pair(pair, sel, alpha=1.0)
    patch.apply(pair.target)
    after = hf_state_dict(pair.target)
    seen: dict[int, set[str]] = {}
    for key, value in after.items():
        m = _LAYER_KEY.search(key)
        axis = LAYOUT[family].get(m.group(2)) if m else None
        if axis is None:
            assert torch.equal(value, before[key]), f"{key} is no neuron's, yet changed"
            continue
        layer = int(m.group(1))
        seen.setdefault(layer, set()).add(m.group(2))
        idx = sel.mask[layer].nonzero().squeeze(-1)
        expected = _expected(before[key], donor[key], axis, idx)
        assert not torch.equal(expected, before[key])  # the two models differ there, so the check can fail
        assert torch.equal(value, expected), f"{key}: not exactly the donor's entries of the selected neurons"
    assert seen == {layer: set(LAYOUT[family]) for layer in range(pair.n_layers)}
    for p in (p for layer in range(pair.n_layers) for p in neuron_params(pair.target, layer)):
        if p.name:  # the HF name of the tensor (what a streamed donor reads)
            assert p.tensor.data_ptr() == after[p.name].data_ptr()
        else:  # only views of a fused tensor have none
            assert "fused" in LAYOUT[family].values()
    patch.revert(pair.target)
    assert all(torch.equal(v, before[k]) for k, v in hf_state_dict(pair.target).items())


@pytest.mark.parametrize("family", TESTED_FAMILIES)
def test_activations_from_hook_in_equal_hook_post(family):
    model = tiny_model(family, seed=2)
    tok = tiny_tokenizer()
    tokens = tok(["How do I bake a cake ?"], return_tensors="pt").input_ids
    store: dict[str, torch.Tensor] = {}
    names = [f"blocks.{layer}.mlp.{h}" for layer in range(model.cfg.n_layers) for h in ("hook_in", "hook_post")]
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(n, lambda x, hook, n=n: store.__setitem__(n, x)) for n in names])
        for layer in range(model.cfg.n_layers):
            got = mlp_hidden(model, layer, store[f"blocks.{layer}.mlp.hook_in"])
            torch.testing.assert_close(got, store[f"blocks.{layer}.mlp.hook_post"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", TESTED_FAMILIES)
def test_planted_neurons_are_recovered(family):
    pair, behaviour, planted = planted_pair(family, n_planted=8, seed=0)
    s = score(pair, behaviour, "weight_attribution", progress=False)
    assert s.top_k(planted.n).overlap(planted) >= 0.95


@pytest.mark.parametrize("family", TESTED_FAMILIES)
def test_a_patched_model_exports_and_reloads_to_the_same_logits(family, tmp_path):
    pair = ModelPair(donor=tiny_model(family, seed=1), target=tiny_model(family, seed=0))
    NeuronPatch.from_pair(pair, _selection(pair.n_layers), alpha=1.0).apply(pair.target)
    reloaded = load_model(export_hf(pair.target, tmp_path / "patched"))
    tokens = tiny_tokenizer()(["Write a poem about the sea ."], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens), pair.target(tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_mixture_of_experts_mlps_are_refused_by_name(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=len(tiny_tokenizer()), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                               moe_intermediate_size=48, shared_expert_intermediate_size=48)
    hf = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts") as err:
        load_model(hf, tokenizer=tiny_tokenizer())
    assert len(str(err.value)) < 400


def test_a_family_the_bridge_cannot_wrap_gets_a_short_error():
    from transformers import BioGptConfig, BioGptForCausalLM

    hf = BioGptForCausalLM(BioGptConfig(vocab_size=len(tiny_tokenizer()), hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=4, intermediate_size=48))
    with pytest.raises(UnsupportedModelError, match="cannot wrap BioGptForCausalLM") as err:
        load_model(hf, tokenizer=tiny_tokenizer())
    assert "cnt_lens is tested on" in str(err.value) and len(str(err.value)) < 600
