"""Neurons' activations over texts: each text's own, whether its batch's shared prefix ran once or not."""

from __future__ import annotations

import pytest
import torch

from cnt_lens.data.tokens import encode, split_shared_prefix
from cnt_lens.show.activations import sequence_activations
from cnt_lens.workflow.testing import tiny_model, tiny_tokenizer

SYSTEM = "<s> you are a helpful model . answer every question . <user> "  # 13 tokens every text shares
TEXTS = [SYSTEM + t for t in ("tell me a story <assistant> Sure , here is a story .",
                              "what is this <assistant> Sorry",
                              "how do I bake bread <assistant> First , mix the flour and the water .")]
NEURONS = [(1, 5), (0, 2), (1, 0), (0, 7)]  # two layers, out of layer order: columns come back in this order
FIRST_LAYER = [(0, 7), (0, 2)]  # the pass stops after block 0, the cached prefix's second layer unread


@pytest.mark.parametrize("neurons", [NEURONS, FIRST_LAYER], ids=["every-layer", "stops-early"])
def test_a_shared_prefix_runs_once_and_every_text_reads_as_it_does_alone(arch, neurons):
    model, tok = tiny_model(arch, seed=2), tiny_tokenizer()
    batch = encode(tok, TEXTS)
    split = split_shared_prefix(batch)
    assert split is not None and split.width >= 8
    alone = [sequence_activations(model, [encode(tok, [t])], neurons) for t in TEXTS]  # one row: nothing shared
    sequence_activations(model, [batch], neurons)  # a model's first shared batch is checked against the plain pass
    widths: list[tuple[int, ...]] = []
    embed = model.original_model.get_input_embeddings()
    handle = embed.register_forward_hook(lambda m, args, out: widths.append(tuple(args[0].shape)))
    try:
        ids, acts = sequence_activations(model, [batch], neurons)
    finally:
        handle.remove()
    assert widths == [(1, split.width), (len(TEXTS), split.tail.shape[1])]
    for row, ((one_ids, one_acts), text) in enumerate(zip(alone, TEXTS)):
        assert ids[row] == one_ids[0] == tok(text, add_special_tokens=False)["input_ids"]
        assert acts[row].shape == (len(ids[row]), len(neurons))
        torch.testing.assert_close(acts[row], one_acts[0], rtol=1e-4, atol=1e-5)


def test_texts_without_a_shared_prefix_read_in_one_plain_pass():
    model, tok = tiny_model("llama", seed=2), tiny_tokenizer()
    texts = ["<s> tell me a story", "<s> what is this thing you have here"]
    batch = encode(tok, texts)
    assert split_shared_prefix(batch) is None
    ids, acts = sequence_activations(model, [batch], NEURONS)
    for row, text in enumerate(texts):
        one_ids, one_acts = sequence_activations(model, [encode(tok, [text])], NEURONS)
        assert ids[row] == one_ids[0]
        torch.testing.assert_close(acts[row], one_acts[0], rtol=1e-4, atol=1e-5)
