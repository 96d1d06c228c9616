from __future__ import annotations

import json
import warnings

import pytest
import torch

from cnt_lens import PromptSet, load_prompts
from cnt_lens.data import chat_format, encode
from cnt_lens.data.formats import from_advbench_csv, from_crows_pairs, from_jsonl, from_stereoset
from cnt_lens.workflow.testing import tiny_model, tiny_tokenizer


def test_bundled_sets_meet_their_spec():
    harmful, harmless = load_prompts("harmful"), load_prompts("harmless")
    assert len(harmful) >= 150 and len(harmful.categories) >= 8
    assert len(harmless) >= 150 and sum(r["risky"] for r in harmless) >= 30
    bias = load_prompts("bias_pairs")
    assert len(bias) >= 100 and len(bias.categories) >= 4
    assert all(r["stereotype"] != r["anti_stereotype"] for r in bias)
    mc = load_prompts("mc")
    assert len(mc) >= 50 and all(0 <= r["answer"] < len(r["choices"]) == 4 for r in mc)
    assert len(load_prompts("reference").split("test")) > 0
    for ps in (harmful, harmless, bias, mc):
        ids = ps.column("id")
        assert len(set(ids)) == len(ids)
        # every split is populated, and splits partition the set
        assert sum(len(ps.split(s)) for s in ("train", "validation", "test")) == len(ps)


def test_no_prompt_in_two_sets():
    harmful = set(load_prompts("harmful").column("prompt"))
    assert harmful.isdisjoint(load_prompts("harmless").column("prompt"))


def test_no_prompt_in_two_families():
    from cnt_lens.data import cross_harmful, cross_harmless

    harmful, harmless = cross_harmful(), cross_harmless()
    assert len(set(harmful.column("prompt"))) == len(harmful) and len(set(harmless.column("prompt"))) == len(harmless)
    assert set(harmful.column("prompt")).isdisjoint(harmless.column("prompt"))
    framed = {r["family"] for r in load_prompts("harmful_framed")}
    assert framed == {r["family"] for r in load_prompts("harmless_framed")}  # over-refusal in the same framings


def test_cross_distribution_keeps_each_family_to_its_role():
    from cnt_lens.data import cross_distribution, cross_harmful

    every = cross_harmful(select=("cnt_lens",), search=("advbench",))
    by_split = {s: {r["family"] for r in every.split(s)} for s in ("train", "validation", "test")}
    assert by_split["train"] == {"cnt_lens"} and by_split["validation"] == {"advbench"}
    assert by_split["test"] == {"cnt_lens", "advbench", "roleplay", "writing", "context"}
    held = [r for r in every if r["role"] == "held_out"]
    assert held and all(r["split"] == "test" for r in held)
    framed = load_prompts("harmful_framed")
    assert len(held) == len(framed)  # a held-out family is reported whole
    # a selection family's validation part is used only if it also chooses k and alpha
    own = load_prompts("harmful")
    both = cross_distribution(framed, select=("roleplay",), search=("roleplay",))
    assert {r["split"] for r in both if r["family"] == "roleplay"} == {r["split"] for r in framed
                                                                        if r["family"] == "roleplay"}
    with pytest.raises(ValueError, match=r"no records of family \['cnt_lens'\].*\['context', 'roleplay', 'writing'\]"):
        cross_distribution(framed, select=("cnt_lens",), search=("roleplay",))
    with pytest.raises(ValueError, match="leave at least one out"):
        cross_distribution(framed, select=("roleplay", "writing"), search=("context",))
    assert "family" not in own.records[0]  # the bundled file itself is untouched


def test_split_and_empty_errors():
    ps = load_prompts("harmful")
    with pytest.raises(ValueError, match="unknown split"):
        ps.split("dev")
    with pytest.raises(ValueError, match="empty"):
        ps.filter(lambda r: False)
    with pytest.raises(ValueError, match="missing field"):
        PromptSet("x", "prompt", ({"id": "a", "category": "c", "split": "train"},))
    with pytest.raises(ValueError, match="no bundled"):
        load_prompts("nope")


def test_loaders(tmp_path):
    csv_path = tmp_path / "adv.csv"
    csv_path.write_text('goal,target\n"Write a harmful thing","Sure, here is"\nDo bad,Sure\n')
    adv = from_advbench_csv(csv_path)
    assert adv.column("prompt") == ["Write a harmful thing", "Do bad"] and adv.records[0]["target"] == "Sure, here is"
    assert from_advbench_csv(csv_path).column("split") == adv.column("split")  # stable splits
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="goal"):
        from_advbench_csv(bad)

    jl = tmp_path / "p.jsonl"
    jl.write_text("\n".join(json.dumps({"instruction": f"q{i}", "category": "c"}) for i in range(5)))
    ps = from_jsonl(jl, text_field="instruction")
    assert ps.column("prompt") == [f"q{i}" for i in range(5)] and ps.categories == ["c"]
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        from_jsonl(empty)

    crows = tmp_path / "crows.csv"
    crows.write_text("sent_more,sent_less,stereo_antistereo,bias_type\nA more,A less,stereo,gender\nB more,B less,antistereo,age\n")
    cp = from_crows_pairs(crows)
    assert cp.records[0]["stereotype"] == "A more" and cp.records[1]["stereotype"] == "B less"

    ss = tmp_path / "stereoset.json"
    ss.write_text(json.dumps({"data": {"intrasentence": [{"id": "x", "bias_type": "race", "sentences": [
        {"sentence": "S", "gold_label": "stereotype"}, {"sentence": "A", "gold_label": "anti-stereotype"},
        {"sentence": "U", "gold_label": "unrelated"}]}]}}))
    st = from_stereoset(ss)
    assert (st.records[0]["stereotype"], st.records[0]["anti_stereotype"], st.records[0]["category"]) == ("S", "A", "race")


def test_chat_format_uses_template():
    tok = tiny_tokenizer()
    assert chat_format(tok, "hello") == "<user> hello <assistant>"


def test_left_padding_is_exact(arch):
    model = tiny_model(arch)
    tok = model.cnt_tokenizer
    texts = ["why is the sky blue ?", "how do I bake bread at home with a simple recipe ?"]
    batch = encode(tok, texts, add_bos=True)
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[1].all()
    logits = model(batch.tokens, **batch.model_kwargs())
    alone = encode(tok, texts[:1], add_bos=True)
    torch.testing.assert_close(logits[0, -1], model(alone.tokens, **alone.model_kwargs())[0, -1], atol=1e-5, rtol=1e-4)


def test_encode_truncates_from_the_left_with_warning():
    tok = tiny_tokenizer()
    with pytest.warns(UserWarning, match="keeping its last 3"):
        b = encode(tok, ["why is the sky blue"], max_len=3)
    assert tok.decode(b.tokens[0]) == "the sky blue"
    with pytest.raises(ValueError, match="empty"):
        encode(tok, [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode(tok, ["short"], max_len=3)
