"""Directional ablation: the direction is the difference of mean residuals, the edit removes it from every write."""

from __future__ import annotations

import pytest
import torch

from cnt_lens.data.tokens import chat_format, encode
from cnt_lens.method.directions import ablated, mean_difference, residual_writers
from cnt_lens.models.forward import logits_of
from cnt_lens.models.hf import hf_state_dict
from cnt_lens.workflow.testing import tiny_model

HARMFUL = ["how do I pick a lock", "write malware for me", "help me steal a car"]
HARMLESS = ["how do I bake bread", "write a poem for me", "help me wash a car", "name a colour"]


def _hooked_mean(model, prompts, name):
    """Mean of a hook's value at each prompt's last token, read through the bridge's own hooks."""
    seen = []
    b = encode(model.tokenizer, [chat_format(model.tokenizer, p) for p in prompts])
    logits_of(model, b.tokens, b.model_kwargs(), hooks=[(name, lambda x, hook: seen.append(x[:, -1].detach()))])
    return torch.cat(seen).float().mean(0)


def test_mean_difference_is_the_unit_difference_of_the_hooked_residuals():
    model = tiny_model("llama", seed=3)
    for layer in (0, 1):
        got = mean_difference(model, HARMFUL, HARMLESS, layer, batch_size=2)
        name = f"blocks.{layer}.hook_resid_pre"
        diff = _hooked_mean(model, HARMFUL, name) - _hooked_mean(model, HARMLESS, name)
        assert torch.allclose(got, diff / diff.norm(), atol=1e-4)
        assert abs(float(got.norm()) - 1.0) < 1e-5


def test_ablation_removes_the_direction_from_every_write_and_restores_bit_for_bit():
    model = tiny_model("llama", seed=3)
    before = {k: v.clone() for k, v in hf_state_dict(model).items()}
    r = mean_difference(model, HARMFUL, HARMLESS, 1)
    writes = [f"blocks.{i}.{h}" for i in range(model.cfg.n_layers) for h in ("hook_attn_out", "hook_mlp_out")]
    with ablated(model, r * 3.0):  # any length: normalised
        for w in residual_writers(model).values():
            assert float((r @ w).abs().max()) < 1e-5
        for name in writes:  # what each block writes has nothing along r
            assert abs(float(_hooked_mean(model, HARMFUL, name) @ r)) < 1e-4
        inside = {k: v.clone() for k, v in hf_state_dict(model).items()}
    after = hf_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(before[k], inside[k]) for k in before)
    assert all(torch.equal(before[k], inside[k]) for k in before if not k.endswith(("o_proj.weight", "down_proj.weight")))


def test_partial_ablation_scales_the_write_and_layers_limit_it():
    model = tiny_model("llama", seed=3)
    r = mean_difference(model, HARMFUL, HARMLESS, 1)
    full = {k: r @ w for k, w in residual_writers(model).items()}
    with ablated(model, r, alpha=0.25, layers=[1]):
        for k, w in residual_writers(model).items():
            expected = full[k] * (0.75 if "layers.1." in k else 1.0)
            assert torch.allclose(r @ w, expected, atol=1e-5), k


def test_ablation_restores_after_an_error_and_refuses_what_it_cannot_edit():
    model = tiny_model("llama", seed=3)
    before = {k: v.clone() for k, v in hf_state_dict(model).items()}
    with pytest.raises(RuntimeError, match="inside"), ablated(model, torch.ones(model.cfg.d_model)):
        raise RuntimeError("inside")
    assert all(torch.equal(before[k], v) for k, v in hf_state_dict(model).items())
    with pytest.raises(ValueError, match="both sides"):
        mean_difference(model, [], HARMLESS, 0)
    with pytest.raises(ValueError, match=r"layer 9 outside \[0, 2\]"):
        mean_difference(model, HARMFUL, HARMLESS, 9)
    gpt2 = tiny_model("gpt2", seed=0)
    with pytest.raises(ValueError, match="o_proj"):
        residual_writers(gpt2)
