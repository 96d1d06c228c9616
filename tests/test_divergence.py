"""First-token KL from the unedited model, and the bootstrap interval every mean carries."""

from __future__ import annotations

import copy

import pytest
import torch

from cnt_lens import NeuronPatch, Refusal, TransferConfig, transfer
from cnt_lens.core.stats import bootstrap_interval, mean
from cnt_lens.method.config import override
from cnt_lens.method.divergence import KL_NAME, first_token_kl, next_token_logprobs
from cnt_lens.workflow.testing import planted_pair, tiny_model


def _full_forward_kl(reference_model, edited_model, batches) -> list[float]:
    """Per input: KL(reference ‖ edited) from every position's logits, by torch's own kl_div."""
    out = []
    with torch.no_grad():
        for b in batches:
            ref = reference_model(b.tokens, **b.model_kwargs())[:, -1].float().log_softmax(-1)
            ed = edited_model(b.tokens, **b.model_kwargs())[:, -1].float().log_softmax(-1)
            out += torch.nn.functional.kl_div(ed, ref, log_target=True, reduction="none").sum(-1).tolist()
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_padded_batch_reads_each_prompts_own_next_token(arch):
    model = tiny_model(arch, seed=3)
    tok = model.cnt_tokenizer
    together = next_token_logprobs(model, Refusal().kl_batches(tok, "test", 8))
    alone = next_token_logprobs(model, Refusal().kl_batches(tok, "test", 1))
    assert together.shape == alone.shape and together.shape[0] == len(Refusal().harmless.split("test"))
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_kl_is_zero_for_the_unedited_model_and_torchs_kl_for_an_edit():
    pair, behaviour, planted = planted_pair("llama", n_planted=8, seed=2)
    batches = behaviour.kl_batches(pair.tokenizer, "test", 4)
    reference = next_token_logprobs(pair.target, batches)
    same = first_token_kl(pair.target, reference, batches)
    assert same[KL_NAME] == 0.0 and same[f"{KL_NAME}_ci95"] == [0.0, 0.0]
    assert same[f"{KL_NAME}_n"] == len(behaviour.controls.split("test"))
    with NeuronPatch.from_pair(pair, planted, alpha=2.0).applied(pair.target):
        edited = first_token_kl(pair.target, reference, batches)
        edited_model = copy.deepcopy(pair.target)
    # the same number from full forwards of the two models (every position unembedded) and torch's KL
    expected = _full_forward_kl(pair.target, edited_model, batches)
    assert edited[KL_NAME] > 0
    assert edited[KL_NAME] == pytest.approx(sum(expected) / len(expected), rel=1e-4, abs=1e-7)
    lo, hi = edited[f"{KL_NAME}_ci95"]
    assert lo <= edited[KL_NAME] <= hi


def test_a_transfer_reports_each_models_first_token_kl_from_the_target():
    pair, behaviour, _ = planted_pair("llama", n_planted=8, seed=2)
    cfg = override(TransferConfig(), {"baselines.methods": ("random",), "ranking.rounds": 0,
                                      "search.screen": False, "search.alphas": (1.0, 2.0)})
    result = transfer(pair, behaviour, cfg, progress=False)
    blocks = result.blocks
    assert blocks["target"][KL_NAME] == 0.0  # the unedited model, by definition
    assert blocks["donor"][KL_NAME] > 0
    batches = behaviour.kl_batches(pair.tokenizer, "test", cfg.evaluation.batch_size)
    reference = next_token_logprobs(pair.target, batches)
    with result.patch.applied(pair.target):
        again = first_token_kl(pair.target, reference, batches)
    assert blocks[result.patch.meta["method"]][KL_NAME] == pytest.approx(again[KL_NAME], rel=1e-6, abs=1e-9)
    assert KL_NAME in result.report.numbers()  # a column of the CLI table and the report


def test_the_bootstrap_interval_holds_the_mean_narrows_with_n_and_repeats_with_its_seed():
    g = torch.Generator().manual_seed(0)
    few = torch.rand(20, generator=g).tolist()
    many = torch.rand(2000, generator=g).tolist()
    for values in (few, many):
        lo, hi = bootstrap_interval(values)
        assert lo <= sum(values) / len(values) <= hi
    assert bootstrap_interval(few) == bootstrap_interval(few)
    assert (bootstrap_interval(many)[1] - bootstrap_interval(many)[0]) < (bootstrap_interval(few)[1]
                                                                          - bootstrap_interval(few)[0])
    block = mean("x", few)
    assert block["x_n"] == 20 and block["x_ci95"] == list(bootstrap_interval(few))


def test_the_field_units_table_shows_refusals_per_100_and_the_kl_of_every_model():
    from cnt_lens.core.stats import rate
    from cnt_lens.method.evaluate import Report

    def block(flags, kls):
        return {**rate("refusal_harmful", flags), **mean(KL_NAME, kls)}

    report = Report(behaviour="refusal", split="test", n_neurons_total=100, target=block([0, 0, 0, 1], [0.0] * 3),
                    donor=block([1, 1, 1, 1], [0.5, 0.7, 0.6]), patched={"method": "m", **block([1, 1, 1, 0], [0.1] * 3)},
                    baselines=[{"method": "random", **block([0, 0, 0, 0], [0.01] * 3)}])
    lines = report.units_table().splitlines()
    assert len(lines) == 2 + 4 and "refusal_harmful per 100" in lines[0] and KL_NAME in lines[0]
    patched = next(x for x in lines if x.startswith("| patched"))
    lo, hi = rate("refusal_harmful", [1, 1, 1, 0])["refusal_harmful_ci95"]
    assert f"75.0 [{100 * lo:.1f}, {100 * hi:.1f}] n=4" in patched and "0.1000" in patched


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_an_evaluation_that_generates_from_the_kl_inputs_gives_the_kl_without_a_pass_of_its_own(arch, monkeypatch):
    from cnt_lens.method import divergence
    from cnt_lens.method.divergence import KLReference, watching
    from cnt_lens.method.evaluate import measure

    target, edited = tiny_model(arch, seed=3), tiny_model(arch, seed=4)
    behaviour = Refusal(max_new_tokens=2)
    reference = KLReference.of_model(target, behaviour.kl_batches(target.cnt_tokenizer, "validation", 8))
    direct = reference.of(edited)
    with watching(reference) as seen:
        measure(edited, [behaviour], "validation", batch_size=8)
    assert len(seen) == direct[f"{KL_NAME}_n"] and all(v is not None for v in seen.values())
    runs = []
    monkeypatch.setattr(divergence, "logits_of", lambda *a, **k: runs.append(a) or pytest.fail("a pass was run"))
    shared = reference.of(edited, seen)
    assert runs == []
    assert direct[KL_NAME] > 0.01  # two different models: a KL the comparison can tell from zero
    assert shared[KL_NAME] == pytest.approx(direct[KL_NAME], rel=1e-4)
    assert shared[f"{KL_NAME}_n"] == direct[f"{KL_NAME}_n"]
    # an input no generation saw is run: everything read again except one, the same numbers
    partial = dict(seen)
    partial[next(iter(partial))] = None
    monkeypatch.undo()
    assert reference.of(edited, partial)[KL_NAME] == pytest.approx(direct[KL_NAME], rel=1e-4)
