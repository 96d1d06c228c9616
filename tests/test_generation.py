"""Generation parity: cnt_lens's greedy generation equals plain-HF greedy generation, token for token.

The reference is an independent plain HF model (a deep copy made before the bridge wraps the
original; for SmolLM2 a second load of the GGUF), so a fault in the bridge's handling of the KV
cache — transformers 5.24 emits one token and then ``-`` forever through it — fails here.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cnt_lens import generate, load_model, load_prompts
from cnt_lens.data import chat_format, encode
from cnt_lens.models import TESTED_FAMILIES
from cnt_lens.workflow.testing import tiny_hf_model, tiny_tokenizer

N_NEW = 12


def _reference(hf, tok, prompts: list[str], n_new: int) -> list[str]:
    b = encode(tok, prompts)
    with torch.no_grad():
        out = hf.generate(input_ids=b.tokens, attention_mask=b.attention_mask, max_new_tokens=n_new, do_sample=False,
                          pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
    return tok.batch_decode(out[:, b.tokens.shape[1]:], skip_special_tokens=True)


def _prompts(tok, n: int) -> list[str]:
    return [chat_format(tok, p) for p in load_prompts("harmless").split("validation").column("prompt")[:n]]


@pytest.mark.parametrize("arch", TESTED_FAMILIES)
def test_generation_matches_plain_hf_on_tiny_models(arch):
    tok = tiny_tokenizer()
    hf = tiny_hf_model(arch, seed=3, tie_embeddings=False)  # tied, some families' random models echo <assistant>
    reference = copy.deepcopy(hf)
    model = load_model(hf, tokenizer=tok)
    prompts = _prompts(tok, 6)
    got = generate(model, prompts, max_new_tokens=N_NEW, batch_size=3, progress=False)
    assert got == _reference(reference, tok, prompts, N_NEW)
    assert all(got) and len({w for g in got for w in g.split()}) > 1  # real text, not one token repeated


@pytest.mark.parametrize("arch", TESTED_FAMILIES)
def test_answers_cut_by_until_are_the_whole_answers_up_to_where_it_first_holds(arch):
    """``until`` drops finished rows from the batch and its KV cache; every other row's answer is unchanged.

    The prompts share a preamble longer than ``_prefill``'s threshold, so the own loop also runs it once
    for the batch; their lengths differ, so the padding it moves between preamble and rest is exercised.
    """
    from cnt_lens.data import shared_prefix_length

    tok = tiny_tokenizer()
    model = load_model(tiny_hf_model(arch, seed=3, tie_embeddings=False), tokenizer=tok)
    words = load_prompts("harmless").split("validation").column("prompt")
    prompts = [chat_format(tok, "Please answer as plainly and briefly as you can. " + w) for w in words[:6]]
    batch = encode(tok, prompts[:3])
    assert shared_prefix_length(batch) >= 8 and len(set(batch.attention_mask.sum(-1).tolist())) > 1
    whole = generate(model, prompts, max_new_tokens=N_NEW, batch_size=3, progress=False)
    assert generate(model, prompts, max_new_tokens=N_NEW, batch_size=3, progress=False,
                    until=lambda text: False) == whole  # the own loop, never stopping early: HF's answers
    stop_at = {w for g in whole[::2] for w in g.split()[1:2]}  # a word some answers reach after their first
    until = lambda text: any(w in text.split() for w in stop_at)  # noqa: E731
    cut = generate(model, prompts, max_new_tokens=N_NEW, batch_size=3, progress=False, until=until)
    ids = [tok(w, add_special_tokens=False)["input_ids"] for w in whole]
    for w, c, t in zip(whole, cut, ids):
        first = next((n for n in range(1, len(t) + 1) if until(tok.decode(t[:n], skip_special_tokens=True))), None)
        assert c == (w if first is None else tok.decode(t[:first], skip_special_tokens=True)), (w, c)
    assert sum(c != w for c, w in zip(cut, whole)) >= 2  # some rows did leave early


def test_length_sorted_batches_return_each_prompts_own_answer_in_input_order():
    tok = tiny_tokenizer()
    model = load_model(tiny_hf_model("llama", seed=3, tie_embeddings=False), tokenizer=tok)
    words = load_prompts("harmless").split("validation").column("prompt")
    prompts = [chat_format(tok, " ".join(words[:n])) for n in (3, 1, 5, 2, 4, 1)]  # lengths out of order
    alone = [generate(model, [p], max_new_tokens=N_NEW, progress=False)[0] for p in prompts]
    assert generate(model, prompts, max_new_tokens=N_NEW, batch_size=2, progress=False) == alone
    assert len(set(alone)) > 1  # the prompts get different answers, so a reordering would show


@pytest.mark.slow
def test_generation_matches_plain_hf_on_smollm2(smollm2):
    from transformers import AutoModelForCausalLM

    from cnt_lens.models import bundled_gguf_path

    path = bundled_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tok = smollm2.cnt_tokenizer
    prompts = [chat_format(tok, "What is the capital of France?"), *_prompts(tok, 3)]
    got = generate(smollm2, prompts, max_new_tokens=24, batch_size=4, progress=False)
    assert got == _reference(reference, tok, prompts, 24)
    assert "Paris" in got[0]


def test_broken_generation_raises_instead_of_reading_as_garbage(monkeypatch):
    """The 5.24 symptom (first token right, then '-' forever) is caught by the forward-pass check."""
    import cnt_lens.behaviours.generation as bh
    from cnt_lens import canary
    from cnt_lens.behaviours import GenerationError
    from cnt_lens.workflow.testing import tiny_model

    model = tiny_model("llama", seed=3)
    tok = tiny_tokenizer()
    dash = tok.convert_tokens_to_ids("-")
    honest = bh._greedy_until

    def dashes(*args, **kwargs):
        out, lengths = honest(*args, **kwargs)
        out[:, 1:] = dash
        return out, lengths

    prompts = _prompts(tok, 4)
    assert generate(model, prompts, max_new_tokens=8, progress=False)  # fine before the fault
    monkeypatch.setattr(bh, "_greedy_until", dashes)
    with pytest.raises(GenerationError, match="disagrees with the model's forward pass"):
        generate(model, prompts, max_new_tokens=8, progress=False)
    with pytest.raises(GenerationError):
        canary(model)


@pytest.mark.parametrize("target", ["most padded", "least padded"])
def test_a_fault_in_one_row_is_caught_by_the_rows_the_check_reads(monkeypatch, target):
    """``verify_greedy`` reads a few rows of a batch; a fault in the most or least left-padded one alone still raises."""
    import cnt_lens.behaviours.generation as bh
    from cnt_lens.behaviours import GenerationError
    from cnt_lens.workflow.testing import tiny_model

    model = tiny_model("llama", seed=3)
    tok = tiny_tokenizer()
    dash = tok.convert_tokens_to_ids("-")
    honest = bh._greedy_until

    def one_bad_row(plain, b, *args, **kwargs):
        out, lengths = honest(plain, b, *args, **kwargs)
        widths = b.attention_mask.sum(-1)
        out[int(widths.argmin() if target == "most padded" else widths.argmax()), 1:] = dash
        return out, lengths

    words = load_prompts("harmless").split("validation").column("prompt")[:8]
    prompts = [chat_format(tok, w * (1 + i % 3)) for i, w in enumerate(words)]  # widths differ within the batch
    assert len(set(encode(tok, prompts).attention_mask.sum(-1).tolist())) > 4
    monkeypatch.setattr(bh, "_greedy_until", one_bad_row)
    with pytest.raises(GenerationError, match="disagrees with the model's forward pass"):
        generate(model, prompts, max_new_tokens=8, batch_size=8, progress=False)


def test_the_check_reads_the_padding_and_answer_length_extremes():
    from cnt_lens.behaviours.generation import _rows_to_verify

    mask = torch.ones(10, 7, dtype=torch.long)
    for row, pad in enumerate([3, 1, 0, 2, 4, 0, 1, 2, 5, 1]):
        mask[row, :pad] = 0
    real = torch.zeros(10, 6, dtype=torch.bool)
    for row, n in enumerate([2, 6, 3, 3, 4, 5, 1, 2, 3, 4]):
        real[row, :n] = True
    for rows in (1, 2, 4, 6):
        pick = _rows_to_verify(mask, real, rows).tolist()
        assert pick == sorted(set(pick)) and len(pick) == rows
        extremes = [int(mask.sum(-1).argmin()), int(mask.sum(-1).argmax()), int(real.sum(-1).argmax()),
                    int(real.sum(-1).argmin())]
        assert set(extremes[:rows]) <= set(pick)
    assert _rows_to_verify(mask, real, None).tolist() == list(range(10))
    assert _rows_to_verify(mask, real, 20).tolist() == list(range(10))
    with pytest.raises(ValueError, match="at least one row"):
        _rows_to_verify(mask, real, 0)
