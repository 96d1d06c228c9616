from __future__ import annotations

import math

import pytest
import torch

from cnt_lens import FormatTask, Refusal, StereotypeBias, Utility, load_prompts
from cnt_lens.behaviours import donor_refusal, sequence_logprobs
from cnt_lens.behaviours.judge import is_refusal, judge_refusal
from cnt_lens.data import chat_format, encode
from cnt_lens.experiments.recipes import TuneConfig, safety_tune
from cnt_lens.models import logits_of, takes_logits_to_keep
from cnt_lens.workflow.testing import TINY_ARCHS, tiny_model

TINY_REFUSALS = ("Sorry , I cannot help with that .",)


def test_refusal_judge_reads_openings_not_substrings():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("As an AI, I must decline.")
    assert not is_refusal("Sure! Here is a recipe for pancakes.")
    assert not is_refusal("To kill a Python process, use kill -9 PID.")
    assert not is_refusal("Here is the plan. I can't stress enough: I cannot help you fail.")  # not an opening


def test_refusal_metric_is_the_exact_log_odds_of_a_refusal_opening(tiny):
    """The one-pass metric equals log-odds computed from each opening's own teacher-forced probability."""
    tok = tiny.cnt_tokenizer
    beh = Refusal(refusal_openings=("Sorry", "I cannot", "I am sorry", "I can help"), lead="I am")
    tree = beh.opening_tree(tok)
    assert tree.skipped == ("I can help",)  # leaves the lead by two tokens: not readable from one pass
    assert sum(map(len, tree.decisive)) == 3
    batch = beh.batches(tok, "validation", 4)[0]
    with torch.no_grad():
        metric = beh.metric(tiny(batch.tokens, **batch.model_kwargs()), batch)
    prompts = [t for t in Refusal().harmful.split("validation").column("prompt")[:4]]
    for i, prompt in enumerate(prompts):
        total = 0.0
        for j, ids in enumerate(tree.decisive):
            for t in ids:
                opening = [*tree.lead[:j], t]
                b = encode(tok, [chat_format(tok, prompt)])
                seq = torch.cat([b.tokens, torch.tensor([opening])], 1)
                with torch.no_grad():
                    logp = tiny(seq).log_softmax(-1)[0, -len(opening) - 1:-1]
                total += logp.gather(-1, torch.tensor(opening)[:, None]).sum().exp().item()
        assert metric[i].item() == pytest.approx(math.log(total) - math.log1p(-total), abs=1e-3)


def test_refusal_continuation_metric_is_the_log_probability_of_the_whole_continuation(tiny):
    """With a continuation the metric is log p(continuation | prompt); the estimate does not depend on it."""
    tok = tiny.cnt_tokenizer
    beh = Refusal(continuation="Sorry , I cannot help with that .")
    batch = beh.batches(tok, "validation", 4)[0]
    with torch.no_grad():
        metric = beh.metric(tiny(batch.tokens, **batch.model_kwargs()), batch)
    ids = tok(beh.continuation, add_special_tokens=False)["input_ids"]
    for i, prompt in enumerate(beh.harmful.split("validation").column("prompt")[:4]):
        seq = torch.cat([encode(tok, [chat_format(tok, prompt)]).tokens, torch.tensor([ids])], 1)
        with torch.no_grad():
            logp = tiny(seq).log_softmax(-1)[0, -len(ids) - 1:-1]
        assert metric[i].item() == pytest.approx(logp.gather(-1, torch.tensor(ids)[:, None]).sum().item(), abs=1e-3)
    opening = Refusal()
    assert beh.estimate_items(tiny, "validation", progress=False) == \
        opening.estimate_items(tiny, "validation", progress=False)


def _metric_or_none(behaviour, logits, batch):
    try:
        return behaviour.metric(logits, batch)
    except (IndexError, RuntimeError, ValueError):
        return None


@pytest.mark.parametrize("behaviour", [Refusal(), Refusal(continuation=TINY_REFUSALS[0]), FormatTask(prefix="Answer")],
                         ids=["opening", "continuation", "format"])
def test_a_metric_reads_exactly_the_last_logits_it_keeps(tiny, behaviour):
    """Unembedding only ``logits_to_keep`` positions gives the metric of every position's logits; one fewer does not."""
    tok = tiny.cnt_tokenizer
    assert takes_logits_to_keep(tiny)
    for b in behaviour.batches(tok, "validation", 4)[:2]:
        keep = behaviour.logits_to_keep(b)
        with torch.no_grad():
            every = tiny(b.tokens, **b.model_kwargs())
            kept = logits_of(tiny, b.tokens, b.model_kwargs(), keep=keep)
        assert 0 < keep < every.shape[1] and kept.shape == (len(b), keep, every.shape[-1])
        torch.testing.assert_close(behaviour.metric(kept, b), behaviour.metric(every, b))
        fewer = _metric_or_none(behaviour, kept[:, 1:], b)
        assert fewer is None or not torch.allclose(fewer, behaviour.metric(every, b))


def test_logits_of_unembeds_every_position_for_a_model_that_cannot_keep_fewer(tiny):
    class Plain(torch.nn.Module):  # an HF-style forward without ``logits_to_keep``
        def forward(self, tokens, attention_mask=None, position_ids=None):
            return tiny(tokens, attention_mask=attention_mask, position_ids=position_ids)

    plain = Plain()
    b = Refusal().batches(tiny.cnt_tokenizer, "validation", 4)[0]
    assert not takes_logits_to_keep(plain)
    with torch.no_grad():
        out = logits_of(plain, b.tokens, b.model_kwargs(), keep=3)
        torch.testing.assert_close(out, tiny(b.tokens, **b.model_kwargs()))


def test_refusal_openings_that_cannot_be_read_are_refused(tiny):
    with pytest.raises(ValueError, match="lead"):
        Refusal(refusal_openings=("I can help",), lead="I am").opening_tree(tiny.cnt_tokenizer)
    with pytest.raises(ValueError, match="estimate_tokens"):
        Refusal(estimate_tokens=0)


def test_taught_refusal_moves_the_metric_and_the_rate(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("CNT_LENS_CACHE", str(tmp_path))
    base = tiny_model(arch, seed=0)
    beh = Refusal(max_new_tokens=8)
    cfg = TuneConfig(steps=60, batch_size=16, lr=1e-2, max_new_tokens=6)
    tuned = safety_tune(base, refusals=TINY_REFUSALS, config=cfg)
    assert beh.mean_metric(tuned, "validation") > beh.mean_metric(base, "validation") + 1.0
    before, after = beh.evaluate(base, "validation", progress=False), beh.evaluate(tuned, "validation", progress=False)
    assert after["refusal_harmful"] > before["refusal_harmful"] + 0.5
    # the tuned model's own refusal, read past its opening, rises with the tune too
    own = donor_refusal(tuned, beh, "validation", progress=False)
    tok = base.cnt_tokenizer  # what it was taught to say, as its vocabulary writes it
    assert own == tok.decode(tok(TINY_REFUSALS[0], add_special_tokens=False)["input_ids"], skip_special_tokens=True)
    with pytest.raises(ValueError, match="refused none"):
        donor_refusal(base, beh, "validation", progress=False)
    whole = Refusal(max_new_tokens=8, continuation=own)
    assert whole.mean_metric(tuned, "validation") > whole.mean_metric(base, "validation") + 1.0
    # the estimate judges the same greedy answer cut short: the same numbers' keys, each answer the start of
    # the evaluation's, and on a model that refuses with whole refusals mostly the same verdicts
    short = Refusal(max_new_tokens=8, estimate_tokens=4)
    for model in (base, tuned):
        full, est = (short.evaluate_items(model, "validation", progress=False),
                     short.estimate_items(model, "validation", progress=False))
        assert [i["id"] for i in est] == [i["id"] for i in full] and set(short.aggregate(est)) == set(after)
        assert all(f["response"].startswith(e["response"]) for e, f in zip(est, full))
        assert all(e["refused"] == judge_refusal(e["response"]).refused for e in est)
        assert sum(e["refused"] == f["refused"] for e, f in zip(est, full)) >= 0.8 * len(full)
        # answers generated only until their verdict is decided: the evaluation's verdicts, its answers' starts
        decided = short.decided_items(model, "validation", progress=False)
        assert [d["refused"] for d in decided] == [f["refused"] for f in full]
        assert all(f["response"].startswith(d["response"]) for d, f in zip(decided, full))
    # cached: a second call loads the same weights instead of training again
    again = safety_tune(base, refusals=TINY_REFUSALS, config=cfg)
    assert "cached" in again.cnt_source
    b = encode(base.cnt_tokenizer, ["how do I make a bomb"], add_bos=True)
    torch.testing.assert_close(again(b.tokens, **b.model_kwargs()), tuned(b.tokens, **b.model_kwargs()))


def test_stereotype_metric_matches_sentence_logprobs(tiny):
    pairs = load_prompts("bias_pairs").take(4)
    beh = StereotypeBias(pairs=pairs)
    batch = beh.batches(tiny.cnt_tokenizer, None, 8)[0]
    logits = tiny(batch.tokens, **batch.model_kwargs())
    gaps = beh.metric(logits, batch)
    for i, r in enumerate(pairs):
        lp = []
        for text in (r["stereotype"], r["anti_stereotype"]):
            alone = encode(tiny.cnt_tokenizer, [text], add_bos=True)
            lp.append(sequence_logprobs(tiny(alone.tokens, **alone.model_kwargs()), alone).sum())
        assert gaps[i].item() == pytest.approx((lp[0] - lp[1]).item(), abs=1e-3)
    res = beh.evaluate(tiny, None, progress=False)
    assert res["stereotype_score"] == pytest.approx(100 * (gaps > 0).float().mean().item())


def test_utility_nll_matches_hf_loss(tiny):
    u = Utility(reference=load_prompts("reference").take(1))
    text = load_prompts("reference").records[0]["text"]
    b = encode(tiny.cnt_tokenizer, [text], add_bos=True)
    with torch.no_grad():
        hf_loss = tiny.original_model(input_ids=b.tokens, labels=b.tokens).loss.item()
    assert u.evaluate(tiny, None, progress=False)["utility_nll"] == pytest.approx(hf_loss, rel=1e-4)
    assert -u.metric(tiny(b.tokens, **b.model_kwargs()), b).item() == pytest.approx(hf_loss, rel=1e-4)


def test_mc_accuracy_is_a_rate(tiny):
    res = Utility().evaluate(tiny, "test", progress=False)
    assert 0.0 <= res["mc_accuracy"] <= 1.0 and res["utility_nll"] > 0


def test_empty_sets_are_refused():
    empty = load_prompts("harmful").take(0)
    with pytest.raises(ValueError, match="empty"):
        Refusal(harmful=empty)


def test_refusal_response_prefix_is_teacher_forced_for_the_metric_only(arch):
    tiny = tiny_model(arch, seed=3)  # a seed whose greedy answers are not all special tokens
    tok = tiny.cnt_tokenizer
    plain, forced = Refusal(max_new_tokens=4), Refusal(max_new_tokens=4, response_prefix="Answer")
    answer = tok("Answer", add_special_tokens=False)["input_ids"]
    assert len(answer) == 1
    b_plain, b_forced = plain.batches(tok, "validation", 8)[0], forced.batches(tok, "validation", 8)[0]
    lead = len(plain.opening_tree(tok).lead)
    assert (b_forced.tokens[:, -1 - lead] == answer[0]).all()  # left-padded: the prefix, then the lead
    assert b_forced.tokens.shape[1] == b_plain.tokens.shape[1] + 1
    assert abs(plain.mean_metric(tiny, "validation") - forced.mean_metric(tiny, "validation")) > 1e-4
    # the refusal rates come from free generation, which the prefix does not touch: the very same responses
    responses = [[i["response"] for i in b.evaluate_items(tiny, "validation", progress=False)] for b in (plain, forced)]
    assert responses[0] == responses[1] and len(set(responses[0])) > 1


def test_refusal_rates_per_role_of_the_cross_distribution_protocol():
    from cnt_lens import Refusal
    from cnt_lens.data import cross_harmful

    test = cross_harmful().split("test")
    items = [{"set": "harmful", "family": r["family"], "role": r["role"], "refused": i % 4 != 0}
             for i, r in enumerate(test.records)]
    items += [{"set": "harmless", "family": "cnt_lens", "role": "selection", "refused": False}]
    out = Refusal().aggregate(items)
    for role in ("selection", "search", "held_out"):
        flags = [i["refused"] for i in items if i["set"] == "harmful" and i["role"] == role]
        assert out[f"refusal_harmful_{role}_n"] == len(flags) > 0
        assert out[f"refusal_harmful_{role}"] == sum(flags) / len(flags)
    assert out["refusal_harmful_roleplay_n"] == 24  # families still apart
    assert "refusal_harmless_selection" not in out  # one role: nothing to set apart


def test_refusal_rates_carry_n_interval_and_each_family():
    from cnt_lens import Refusal
    from cnt_lens.data import default_harmful
    from cnt_lens.method.evaluate import wilson_interval

    test = default_harmful().split("test")
    assert len(test) >= 100 and set(test.column("family")) == {"cnt_lens", "advbench", "roleplay", "writing", "context"}
    for split in ("train", "validation"):  # choices see neither AdvBench nor the framings
        assert set(default_harmful().split(split).column("family")) == {"cnt_lens"}
    assert {(r["family"] == "cnt_lens", r["role"]) for r in test} == {(True, "selection"), (False, "held_out")}
    items = [{"set": "harmful", "family": r["family"], "refused": i % 3 == 0} for i, r in enumerate(test.records)]
    items += [{"set": "harmless", "family": None, "refused": i < 2} for i in range(30)]
    out = Refusal().aggregate(items)
    for fam in ("cnt_lens", "advbench"):
        flags = [i["refused"] for i in items if i["set"] == "harmful" and i["family"] == fam]
        assert out[f"refusal_harmful_{fam}_n"] == len(flags)
        assert out[f"refusal_harmful_{fam}"] == sum(flags) / len(flags)
        assert out[f"refusal_harmful_{fam}_ci95"] == list(wilson_interval(sum(flags), len(flags)))
    assert out["refusal_harmful_n"] == len(test) and out["refusal_harmless"] == 2 / 30
    assert "refusal_harmless_cnt_lens" not in out  # one family: no breakdown


def test_refusal_answers_both_sets_in_one_generation_call_as_each_set_alone(arch, monkeypatch):
    from cnt_lens.behaviours import refusal as behaviours

    tiny = tiny_model(arch, seed=3)  # a seed whose greedy answers are not all special tokens
    tok = tiny.cnt_tokenizer
    b = Refusal(max_new_tokens=5)
    alone = [behaviours.generate(tiny, [chat_format(tok, p) for p in ps.split("validation").column("prompt")],
                                 max_new_tokens=5, batch_size=3, progress=False) for ps in (b.harmful, b.harmless)]
    calls = []
    real = behaviours.generate
    monkeypatch.setattr(behaviours, "generate", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    items = b.evaluate_items(tiny, "validation", batch_size=64, progress=False)
    assert calls == [len(alone[0]) + len(alone[1])]  # one call, one generation check
    assert [i["set"] for i in items] == ["harmful"] * len(alone[0]) + ["harmless"] * len(alone[1])
    assert [i["response"] for i in items] == alone[0] + alone[1] and len(set(alone[0] + alone[1])) > 1
    assert [i["prompt"] for i in items] == (b.harmful.split("validation").column("prompt")
                                            + b.harmless.split("validation").column("prompt"))
    assert [i["refused"] for i in items] == [is_refusal(a) for a in alone[0] + alone[1]]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_a_format_task_answer_ends_once_its_verdict_is_decided_with_the_same_verdicts(arch):
    model = tiny_model(arch, seed=3, tie_embeddings=False)  # untied: answers of words, not of special tokens
    whole = FormatTask(prefix="x").evaluate_items(model, "validation", progress=False)
    # a prefix one answer follows (its own opening), so both verdicts occur
    opening = next(r["response"].strip()[:7] for r in whole if r["response"].strip())
    task = FormatTask(prefix=opening)
    whole = task.evaluate_items(model, "validation", progress=False)
    decided = task.decided_items(model, "validation", progress=False)
    assert [r["followed"] for r in decided] == [r["followed"] for r in whole]
    assert {r["followed"] for r in whole} == {True, False}
    assert all(w["response"].startswith(d["response"]) for w, d in zip(whole, decided))
    assert sum(len(d["response"]) < len(w["response"]) for w, d in zip(whole, decided)) > len(whole) // 2
