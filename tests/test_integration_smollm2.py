"""Integration on the bundled SmolLM2-135M-Instruct (offline): metrics, a real 1% transplant, HF export."""

from __future__ import annotations

import math

import pytest
import torch

from cnt_lens import NeuronPatch, NeuronScores, NeuronSelection, Refusal, export_hf, load_prompts, score
from cnt_lens.data import chat_format, encode
from cnt_lens.models import ModelPair, clone_model, hf_state_dict, read_neurons, write_neurons

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_pair(smollm2):
    """The bundled model as target; a donor that differs in a few neurons' weights."""
    donor = clone_model(smollm2)
    g = torch.Generator().manual_seed(0)
    changed = torch.zeros(30, 1536, dtype=torch.bool)
    for layer in (3, 17, 29):
        idx = torch.randperm(1536, generator=g)[:8]
        changed[layer, idx] = True
        vals = read_neurons(donor, layer, idx)
        write_neurons(donor, layer, idx, {r: v * 1.5 for r, v in vals.items()})
    return ModelPair(donor=donor, target=smollm2), NeuronSelection(changed)


def test_refusal_metric_is_finite_on_the_bundled_model(smollm2):
    beh = Refusal(harmful=load_prompts("harmful").take(8), harmless=load_prompts("harmless").take(8))
    m = beh.mean_metric(smollm2, None)
    assert math.isfinite(m)


def test_one_percent_patch_apply_revert_is_bit_identical(smol_pair):
    smol_pair, changed = smol_pair
    target = smol_pair.target
    before = {k: v.clone() for k, v in hf_state_dict(target).items() if ".mlp." in k}
    scores = NeuronScores(torch.rand(30, 1536, generator=torch.Generator().manual_seed(1)), "random")
    patch = NeuronPatch.from_pair(smol_pair, scores.top_fraction(0.01) | changed, alpha=2.0)
    patch.apply(target)
    assert any(not torch.equal(before[k], v) for k, v in hf_state_dict(target).items() if k in before)
    patch.revert(target)
    assert all(torch.equal(before[k], v) for k, v in hf_state_dict(target).items() if k in before)


def test_weight_attribution_finds_the_changed_neurons(smol_pair):
    smol_pair, changed = smol_pair
    beh = Refusal(harmful=load_prompts("harmful").take(8), harmless=load_prompts("harmless").take(8))
    s = score(smol_pair, beh, "weight_attribution", split=None, progress=False)
    assert torch.isfinite(s.values).all()
    # only the 24 rewritten neurons can have a non-zero weight-space effect
    assert (s.values[~changed.mask] == 0).all() and (s.values[changed.mask] != 0).any()


def test_scores_with_the_chat_template_run_once_per_batch_equal_every_row_run_in_full(smol_pair, monkeypatch):
    """SmolLM2's system prompt is about half of every scored prompt: run once per batch, it leaves the scores
    as they are (and the bridge's KV-cache path passes the check that guards it)."""
    import cnt_lens.method.scoring.attribution as attribution

    smol_pair, changed = smol_pair
    beh = Refusal(harmful=load_prompts("harmful").take(8), harmless=load_prompts("harmless").take(8))
    batch = beh.batches(smol_pair.tokenizer, None, 8)[0]
    split = attribution.split_shared_prefix(batch)
    assert split is not None and split.width >= batch.tokens.shape[1] // 3
    assert attribution._prefix_pass_agrees(clone_model(smol_pair.target), beh, batch, split)
    once = score(smol_pair, beh, "weight_attribution", split=None, progress=False).values
    monkeypatch.setattr(attribution, "split_shared_prefix", lambda *a, **k: None)
    every_row = score(smol_pair, beh, "weight_attribution", split=None, progress=False).values
    torch.testing.assert_close(once, every_row, rtol=1e-4, atol=1e-9)
    assert (once[changed.mask] != 0).any()


def test_export_of_patched_model_reloads_with_same_logits(smol_pair, tmp_path):
    smol_pair, changed = smol_pair
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = smol_pair.target
    sel = NeuronScores(torch.rand(30, 1536, generator=torch.Generator().manual_seed(2)), "random").top_fraction(0.01) | changed
    patch = NeuronPatch.from_pair(smol_pair, sel, alpha=1.0)
    patch.apply(target)
    try:
        export_hf(target, tmp_path / "hf")
        tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
        b = encode(tok, [chat_format(tok, "How do I bake bread?"), chat_format(tok, "Hi")])
        with torch.no_grad():
            ref = target(b.tokens, **b.model_kwargs())
            got = hf(input_ids=b.tokens, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
        real = b.attention_mask.bool()
        # float32 noise only: the bridge and plain HF order some reductions differently, so logits agree to a
        # few units in 1e-6 of the largest logit (which kernels run depends on the CPU); a wrong neuron moves
        # them by ≫1e-3
        scale = float(ref[real].abs().max())
        torch.testing.assert_close(got[real], ref[real], atol=1e-5 * scale, rtol=0)
        assert torch.equal(got[real].argmax(-1), ref[real].argmax(-1))
    finally:
        patch.revert(target)
