"""Score every MLP neuron of a pair by how much transplanting it moves the target toward the donor.

One entry point, :func:`score`, dispatching over the registry
:data:`SCORERS` (:mod:`cnt_lens.method.scoring.registry`): each method is a family function with only its
own options; a new method is one :func:`register_scorer` call.
"""

from __future__ import annotations

from typing import Any

from cnt_lens.behaviours.base import Behaviour
from cnt_lens.method.resume import recall_scores
from cnt_lens.method.scoring.attribution import attribution_family
from cnt_lens.method.scoring.baselines import contrast_family, importance_family, random_family, weight_rule_family
from cnt_lens.method.scoring.common import BehaviourSignalError, Positions
from cnt_lens.method.scoring.patching import patching_effects, patching_family
from cnt_lens.method.scoring.registry import SCORERS, Context, Scored, ScoringMethod, register_scorer
from cnt_lens.method.selection import NeuronScores
from cnt_lens.models.forward import model_tokenizer
from cnt_lens.models.pair import ModelPair

__all__ = ["METHODS", "SCORERS", "BehaviourSignalError", "Context", "Scored", "ScoringMethod", "patching_effects",
           "register_scorer", "score"]

register_scorer("weight_attribution", attribution_family, "first-order effect of copying each neuron's weights",
                kind="weight")
register_scorer("attribution", attribution_family, "classic attribution patching, ∂m/∂a · (a_donor − a_target)",
                kind="activation")
register_scorer("weight_patching", patching_family, "exact effect of copying each candidate's weights", mode="weight")
register_scorer("activation_patching", patching_family, "exact effect of patching each candidate's activation",
                mode="activation")
register_scorer("activation_contrast", contrast_family, "activation difference, behaviour vs control prompts")
register_scorer("weight_diff", weight_rule_family, "‖w_donor − w_target‖ per neuron", rule="weight_diff")
register_scorer("wanda", importance_family, "Σ |W|·‖input‖ on the carrier model", rule="wanda")
register_scorer("snip", importance_family, "Σ |W ⊙ ∂m/∂W| on the carrier model", rule="snip")
register_scorer("nlsr_drift", weight_rule_family, "1 − cos(w_donor, w_target) per neuron (NLSR)", rule="nlsr_drift")
register_scorer("random", random_family, "seeded uniform scores")

METHODS = tuple(SCORERS)


def score(
    pair: ModelPair,
    behaviour: Behaviour,
    method: str = "weight_attribution",
    *,
    split: str | None = "train",
    batch_size: int = 8,
    positions: Positions = "all",
    progress: bool = True,
    **options: Any,
) -> NeuronScores:
    """Score all ``[n_layers, d_mlp]`` neurons of ``pair`` for ``behaviour`` on one split's prompts.

    Methods (higher = transplanting the neuron moves the target toward the donor more):

    - ``weight_attribution`` (default): first-order effect of copying each neuron's *weights* —
      ∂m/∂out · (ã W_out^d − a W_out^t); one donor forward + one target forward/backward per batch.
    - ``attribution``: classic attribution patching, ∂m/∂a · (a_donor − a_target).
    - ``weight_patching`` / ``activation_patching``: exact effect of patching each neuron (its
      weights / its donor activation) measured by forward passes, many neurons per pass. Costly: pass
      ``candidates`` (e.g. attribution's top 1%) to verify and re-rank; other neurons get NaN.
    - baselines: ``activation_contrast``, ``wanda``, ``snip`` (set difference against ``utility``
      if given, dropping its top ``utility_quantile``), ``weight_diff``, ``nlsr_drift``, ``random`` (``seed``).

    Options belong to a method's family; passing one a method does not take is an error naming the
    method's options (``SCORERS[method].options``).

    ``contrast`` (attribution methods): subtract ``contrast`` × the same estimate on the behaviour's
    control prompts (harmless prompts for refusal), favouring neurons that move the behaviour where
    it belongs and not elsewhere (e.g. refusal of harmful but not of harmless requests).

    ``preserve`` (attribution methods): behaviours that must not degrade (e.g. ``Utility()``, whose
    metric is −NLL); each neuron loses ``preserve_weight`` × its estimated *harm* to their metrics
    (``min(effect, 0)``), so neurons whose transplant would hurt them sink in the ranking. The
    penalty is one-sided on purpose: where the donor is better on a preserved metric (realignment:
    the pre-attack model has the lower NLL), a signed term would rank neurons for *improving* it
    and crowd out the behaviour. One weight, or one per behaviour (metrics differ in scale: a mean
    NLL over every token moves far less per neuron than a single-position log-probability).

    ``positions``: ``"all"`` real tokens (default; a weight transplant changes every position) or
    the last ``k``. Scores are accumulated in fp32 whatever the models' dtype, on the models' device
    (``pair.to("cuda")`` first to score on a GPU), and returned on the CPU.

    Raises :class:`BehaviourSignalError` when the metric is NaN or identical on donor and target.
    Inside :func:`~cnt_lens.method.resume.resumable` the scores are remembered and reused.

    Example:
        >>> from cnt_lens.workflow.testing import planted_pair
        >>> pair, behaviour, planted = planted_pair("llama", n_planted=6, seed=0)
        >>> s = score(pair, behaviour, progress=False)
        >>> s.top_k(planted.n).overlap(planted)
        1.0
    """
    if method not in SCORERS:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    spec = SCORERS[method]
    wrong = sorted(set(options) - set(spec.options))
    if wrong:
        raise TypeError(f"option(s) {wrong} do not apply to method {method!r}; its options: {list(spec.options)}")
    settings = {"method": method, "split": split, "batch_size": batch_size, "positions": positions,
                "options": {k: v for k, v in options.items() if k != "donor_metrics"}}  # a cache: no effect on scores
    return recall_scores([pair.target, pair.donor], behaviour, settings,
                         lambda: _score(pair, behaviour, method, split, batch_size, positions, progress, options))


def _score(pair: ModelPair, behaviour: Behaviour, method: str, split: str | None, batch_size: int,
           positions: Positions, progress: bool, options: dict[str, Any]) -> NeuronScores:
    """One scoring pass of :func:`score` (arguments checked, models placed)."""
    spec = SCORERS[method]
    ctx = Context(pair, behaviour, model_tokenizer(pair.target), split, batch_size, positions, progress)
    out = spec.family(ctx, **spec.fixed, **options)
    meta: dict[str, Any] = {"split": split, "positions": positions, **out.meta}
    if out.direction is not None:
        meta.update(metric_donor=out.direction.donor, metric_target=out.direction.target)
        if behaviour.toward is not None:
            meta["toward"] = out.direction.sign
    return NeuronScores(out.values, method, behaviour.name, out.n, meta)
