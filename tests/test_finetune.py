"""The recipes' LM loss reads each example's answer tokens and nothing else."""

from __future__ import annotations

import pytest
import torch

from cnt_lens.data.tokens import encode
from cnt_lens.experiments.finetune import lm_loss
from cnt_lens.workflow.testing import tiny_model, tiny_tokenizer

EXAMPLES = [("<s> <user> tell me a story <assistant>", " Sure , here is a story ."),
            ("<s> <user> what is this <assistant>", " Sorry"),
            ("<s> <user> how do I bake bread <assistant>", " First , mix the flour and the water .")]


def test_lm_loss_is_the_mean_nll_of_the_answer_tokens_alone(arch):
    model, tok = tiny_model(arch, seed=3), tiny_tokenizer()
    idx = [2, 0, 1]  # rows of different lengths: left padding in play
    texts = [EXAMPLES[i][0] + EXAMPLES[i][1] for i in idx]
    b = encode(tok, texts)
    with torch.no_grad():
        logp = model.original_model(input_ids=b.tokens, attention_mask=b.attention_mask,
                                    position_ids=b.position_ids).logits.float().log_softmax(-1)
    nll = []
    for row, i in enumerate(idx):
        n_answer = len(tok(texts[row], add_special_tokens=False)["input_ids"]) - \
            len(tok(EXAMPLES[i][0], add_special_tokens=False)["input_ids"])
        assert n_answer >= 1
        for pos in range(b.tokens.shape[1] - n_answer, b.tokens.shape[1]):  # each answer token, from the one before
            nll.append(-float(logp[row, pos - 1, b.tokens[row, pos]]))
    with torch.no_grad():
        got = float(lm_loss(EXAMPLES)(model, idx))
    assert got == pytest.approx(sum(nll) / len(nll), rel=1e-5)
