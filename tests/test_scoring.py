from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cnt_lens import METHODS, NeuronPatch, NeuronSelection, Utility, score
from cnt_lens.data import PromptSet
from cnt_lens.method.scoring import BehaviourSignalError, patching_effects
from cnt_lens.models import ModelPair, clone_model
from cnt_lens.workflow.testing import CONTROL, MarkerBehaviour, planted_pair


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["weight_attribution", "attribution"])
def test_attribution_recovers_planted_neurons(arch, seed, method):
    pair, behaviour, planted = planted_pair(arch, n_planted=8, seed=seed)
    s = score(pair, behaviour, method, progress=False)
    assert s.top_k(planted.n).overlap(planted) >= 0.95
    assert (s.values[planted.mask] > 0).all()  # signed toward the donor


def test_weight_attribution_sees_output_rewiring_that_activation_attribution_cannot(arch):
    """The donor rewired its neurons' output rows: only weight-space scores see that reliably.

    (Measured on seeds 0-3: weight attribution recovers 8/8 every time; activation attribution
    2/8 to 7/8, because it reads the target's output row.)"""
    weight, activation = [], []
    for seed in range(4):
        pair, behaviour, planted = planted_pair(arch, n_planted=8, seed=seed, rewire_out=True)
        weight.append(score(pair, behaviour, "weight_attribution", progress=False).top_k(8).overlap(planted))
        activation.append(score(pair, behaviour, "attribution", progress=False).top_k(8).overlap(planted))
    assert min(weight) >= 0.95
    assert sum(activation) / len(activation) < 0.8 and min(activation) < 0.6


@pytest.mark.parametrize("method", ["weight_attribution", "attribution", "snip", "wanda", "activation_contrast"])
def test_scores_read_the_same_numbers_from_only_the_logits_the_metric_keeps(planted, method, monkeypatch):
    """Forward passes unembed only the positions read (the metric's last one; one where only activations are read):
    every score is what unembedding all positions gives."""
    import cnt_lens.method.scoring.baselines
    import cnt_lens.method.scoring.common
    import cnt_lens.models

    pair, behaviour, _ = planted
    widths: list[int] = []
    every = False

    def spy(model, tokens, kwargs, hooks=(), keep=0):
        out = cnt_lens.models.logits_of(model, tokens, kwargs, hooks, keep=0 if every else keep)
        widths.append(out.shape[1])
        return out

    monkeypatch.setattr(cnt_lens.method.scoring.common, "logits_of", spy)
    monkeypatch.setattr(cnt_lens.method.scoring.baselines, "logits_of", spy)
    kept = score(pair, behaviour, method, progress=False).values
    assert widths and set(widths) == {1}
    widths.clear()
    every = True
    all_positions = score(pair, behaviour, method, progress=False).values
    assert min(widths) > 1
    torch.testing.assert_close(kept, all_positions, rtol=1e-4, atol=1e-6)


def test_exact_patching_agrees_in_sign_with_attribution(planted):
    pair, behaviour, sel = planted
    for a, e in (("attribution", "activation_patching"), ("weight_attribution", "weight_patching")):
        approx = score(pair, behaviour, a, progress=False).values[sel.mask]
        exact = score(pair, behaviour, e, candidates=sel, progress=False).values[sel.mask]
        assert torch.equal(approx.sign(), exact.sign())


def _copy_effect(pair, behaviour, layer, neuron):
    """Mean metric change from really copying one neuron's weights into the target."""
    sel = NeuronSelection.from_indices([(layer, neuron)], pair.n_layers, pair.d_mlp)
    before = behaviour.mean_metric(pair.target, "train")
    patch = NeuronPatch.from_pair(pair, sel)
    patch.apply(pair.target)
    after = behaviour.mean_metric(pair.target, "train")
    patch.revert(pair.target)
    return after - before


def test_activation_patching_equals_weight_copy_in_last_layer(arch):
    last = 1
    pair, behaviour, planted = planted_pair(arch, n_planted=3, seed=4, layers=[last])
    s = score(pair, behaviour, "activation_patching", candidates=planted, progress=False)
    for layer, neuron in planted.indices():
        assert s.values[layer, neuron].item() == pytest.approx(_copy_effect(pair, behaviour, layer, neuron), abs=1e-4)


def test_weight_patching_equals_weight_copy_in_every_layer(arch):
    pair, behaviour, planted = planted_pair(arch, n_planted=4, seed=3, rewire_out=True)
    # a few non-planted neurons too: their copy changes nothing, and patching must say so
    extra = NeuronSelection.from_indices([(0, 0), (1, 47)], pair.n_layers, pair.d_mlp) - planted
    cand = planted | extra
    s = score(pair, behaviour, "weight_patching", candidates=cand, groups_per_pass=3, progress=False)
    assert torch.isnan(s.values[~cand.mask]).all()
    for layer, neuron in cand.indices():
        assert s.values[layer, neuron].item() == pytest.approx(_copy_effect(pair, behaviour, layer, neuron), abs=1e-4)


def test_group_patching_counts_the_whole_group(planted):
    pair, behaviour, sel = planted
    groups = torch.stack([sel.mask, torch.zeros_like(sel.mask)])
    eff, _, _ = patching_effects(pair, behaviour, behaviour.batches(pair.tokenizer, "train", 8), groups,
                                 mode="weight", progress=False)
    assert eff[1] == 0 and eff[0] > 0


def test_positions_last_k_changes_scores(planted):
    pair, behaviour, sel = planted
    all_pos = score(pair, behaviour, "weight_attribution", progress=False)
    last = score(pair, behaviour, "weight_attribution", positions=1, progress=False)
    assert not torch.allclose(all_pos.values, last.values)
    assert last.top_k(sel.n).overlap(sel) >= 0.95  # the trigger is the last token
    with pytest.raises(ValueError, match="positions"):
        score(pair, behaviour, "weight_attribution", positions=0, progress=False)


def test_every_method_runs_and_baselines_make_sense(planted):
    pair, behaviour, sel = planted
    for method in METHODS:
        kwargs = {"candidates": sel} if method.endswith("patching") else {}
        s = score(pair, behaviour, method, progress=False, **kwargs)
        assert s.shape == (pair.n_layers, pair.d_mlp) and s.method == method
    # weight-difference baselines see exactly the neurons that differ
    assert score(pair, behaviour, "weight_diff", progress=False).top_k(sel.n) == sel
    assert score(pair, behaviour, "random", seed=1, progress=False).values.equal(
        score(pair, behaviour, "random", seed=1, progress=False).values)


def test_utility_set_difference_excludes_neurons(planted):
    pair, behaviour, _ = planted
    s = score(pair, behaviour, "wanda", utility=Utility(), utility_quantile=0.1, progress=False)
    assert int(torch.isnan(s.values).sum()) == s.meta["n_excluded"] == round(0.1 * pair.n_neurons)


def test_identical_models_are_refused(arch):
    pair, behaviour, _ = planted_pair(arch, n_planted=2)
    same = ModelPair(donor=clone_model(pair.target), target=pair.target)
    with pytest.raises(BehaviourSignalError, match="identical"):
        score(same, behaviour, progress=False)


def test_nan_metric_is_refused(planted):
    pair, behaviour, _ = planted

    class NaNBehaviour(type(behaviour)):
        def metric(self, logits, batch):
            return super().metric(logits, batch) * float("nan")

    with pytest.raises(BehaviourSignalError, match="not finite"):
        score(pair, NaNBehaviour(), progress=False)


def test_scores_do_not_depend_on_batching(planted):
    pair, behaviour, _ = planted
    a = score(pair, behaviour, batch_size=4, progress=False).values
    b = score(pair, behaviour, batch_size=64, progress=False).values
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_unknown_method(planted):
    pair, behaviour, _ = planted
    with pytest.raises(ValueError, match="unknown method"):
        score(pair, behaviour, "magic")


def test_contrast_and_preserve_change_rankings_but_keep_specific_neurons(arch):
    """Planted neurons fire only after the trigger, so contrasting with controls keeps them on top."""
    from cnt_lens import Utility

    pair, behaviour, planted = planted_pair(arch, n_planted=6, seed=5)
    plain = score(pair, behaviour, progress=False)
    contrasted = score(pair, behaviour, contrast=1.0, progress=False)
    assert contrasted.meta["contrast"] == 1.0 and not torch.allclose(contrasted.values, plain.values)
    assert contrasted.top_k(planted.n).overlap(planted) >= 0.95
    kept = score(pair, behaviour, preserve=[Utility()], preserve_weight=2.0, progress=False)
    # planted neurons are the only weights that differ and they do not hurt utility: nothing to penalise
    assert kept.meta["preserve"] == ["utility"] and (kept.values <= plain.values + 1e-6).all()


def test_preserve_weights_per_behaviour_add_linearly(arch):
    from cnt_lens import Utility

    pair, behaviour, _ = planted_pair(arch, n_planted=4, seed=6)
    plain = score(pair, behaviour, progress=False).values
    # the planted neurons push every prompt toward "sorry", so they lower log p("cake"): harm to penalise
    other = MarkerBehaviour(marker=CONTROL)
    one = score(pair, behaviour, preserve=[other], preserve_weight=3.0, progress=False).values
    two = score(pair, behaviour, preserve=[other, other], preserve_weight=[1.0, 2.0], progress=False)
    torch.testing.assert_close(two.values - plain, one - plain, rtol=1e-4, atol=1e-6)
    assert two.meta["preserve_weight"] == [1.0, 2.0]
    assert (one <= plain + 1e-6).all() and (one < plain - 1e-6).any()  # a penalty, never a bonus
    with pytest.raises(ValueError, match="preserve weights"):
        score(pair, behaviour, preserve=[Utility()], preserve_weight=[1.0, 2.0], progress=False)


def test_preserve_penalises_harm_only(arch):
    """Preserving the behaviour itself costs nothing (every planted neuron helps it); preserving log p("cake")
    costs each neuron w × its estimated harm to it, and no neuron gains from helping it."""
    pair, behaviour, _ = planted_pair(arch, n_planted=4, seed=6)
    plain = score(pair, behaviour, progress=False).values
    same = score(pair, behaviour, preserve=[behaviour], preserve_weight=5.0, progress=False).values
    torch.testing.assert_close(same, plain)
    other = MarkerBehaviour(marker=CONTROL)
    kept = score(pair, behaviour, preserve=[other], preserve_weight=5.0, progress=False).values
    # the preserved metric's own estimate: score it as the behaviour (its sign points toward the donor)
    alone = score(pair, other, progress=False)
    toward = 1.0 if alone.meta["metric_donor"] > alone.meta["metric_target"] else -1.0
    effect = alone.values * toward  # estimated change of log p("cake") per transplanted neuron
    hurts = effect < -1e-6
    assert hurts.any()
    torch.testing.assert_close(kept, plain + 5.0 * effect.clamp(max=0.0), rtol=1e-4, atol=1e-5)


def test_toward_fixes_the_direction_the_metric_would_infer(arch):
    """A behaviour that declares ``toward`` is scored in that direction even when donor and target metrics disagree."""
    pair, behaviour, planted = planted_pair(arch, n_planted=4, seed=3)
    inferred = score(pair, behaviour, progress=False)
    assert inferred.meta["metric_donor"] > inferred.meta["metric_target"] and "toward" not in inferred.meta
    behaviour.toward = -1.0  # "transplants should lower log p(sorry)": the planted neurons now rank last
    flipped = score(pair, behaviour, progress=False)
    torch.testing.assert_close(flipped.values, -inferred.values)
    assert flipped.meta["toward"] == -1.0 and flipped.top_k(planted.n).overlap(planted) == 0.0
    behaviour.toward = 1.0
    torch.testing.assert_close(score(pair, behaviour, progress=False).values, inferred.values)


PREAMBLE = "You are a careful assistant; answer every question plainly and briefly."


def _preambled(behaviour: MarkerBehaviour) -> MarkerBehaviour:
    """``behaviour`` with every prompt behind the same long preamble, as a chat template's system prompt."""
    def lead(ps):
        return PromptSet(ps.name, ps.kind, tuple({**r, "prompt": f"{PREAMBLE} {r['prompt']}"} for r in ps.records))

    return replace(behaviour, prompts=lead(behaviour.prompts), controls=lead(behaviour.controls))


def _unshared(monkeypatch) -> None:
    import cnt_lens.method.scoring.attribution as attribution

    monkeypatch.setattr(attribution, "split_shared_prefix", lambda *a, **k: None)


def test_a_shared_prompt_prefix_runs_once_and_the_scores_stay_the_same(arch, monkeypatch):
    """Weight attribution runs the prefix every prompt shares once per batch (one row), the rest after it:
    the scores are those of running every row in full, and the planted neurons still come first."""
    import cnt_lens.method.scoring.attribution as attribution

    pair, behaviour, planted = planted_pair(arch, n_planted=6, seed=0)
    behaviour = _preambled(behaviour)
    batch = behaviour.batches(pair.tokenizer, "train", 8)[0]
    shared = attribution.split_shared_prefix(batch)
    assert shared is not None and shared.width >= 8 and shared.tail.shape[1] < batch.tokens.shape[1]
    passes: list[tuple[int, int]] = []
    real = attribution._split_logits

    def spy(model, b, behaviour, split, *hooks):
        passes.append((int(split.head.shape[0]), int(split.tail.shape[1])))
        return real(model, b, behaviour, split, *hooks)

    monkeypatch.setattr(attribution, "_split_logits", spy)
    once = score(pair, behaviour, progress=False)
    assert passes and all(rows == 1 and rest < batch.tokens.shape[1] for rows, rest in passes)
    _unshared(monkeypatch)
    every_row = score(pair, behaviour, progress=False)
    torch.testing.assert_close(once.values, every_row.values, rtol=1e-4, atol=1e-7)
    assert once.top_k(planted.n).overlap(planted) >= 0.95


def test_scoring_falls_back_to_the_plain_pass_where_the_prefix_pass_disagrees(arch, monkeypatch, caplog):
    """A KV-cache path that gives other logits (as a library release once did) is caught on the first batch:
    a warning, and the scores of the plain pass."""
    import cnt_lens.method.scoring.attribution as attribution

    pair, behaviour, _ = planted_pair(arch, n_planted=6, seed=1)
    behaviour = _preambled(behaviour)
    real = attribution._split_logits
    monkeypatch.setattr(attribution, "_split_logits", lambda *a: real(*a).flip(0))  # rows' answers swapped
    with caplog.at_level("WARNING", logger="cnt_lens.method.scoring.attribution"):
        checked = score(pair, behaviour, progress=False)
    assert "scoring without it" in caplog.text
    _unshared(monkeypatch)
    torch.testing.assert_close(checked.values, score(pair, behaviour, progress=False).values, rtol=0, atol=0)
