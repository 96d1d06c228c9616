"""Score every MLP neuron of a :class:`~cnt_lens.ModelPair` by how much transplanting it moves the
target toward the donor's behaviour. One entry point, :func:`score`; see its docstring for methods.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..behaviours import Behaviour
from ..models import ModelPair, model_tokenizer
from ..selection import NeuronScores, NeuronSelection
from . import baselines
from .attribution import attribution_scores
from .common import BehaviourSignalError, Positions, measure_direction
from .patching import patching_effects

__all__ = ["METHODS", "BehaviourSignalError", "patching_effects", "score"]

METHODS = (
    "weight_attribution", "attribution", "weight_patching", "activation_patching",
    "activation_contrast", "weight_diff", "wanda", "snip", "nlsr_drift", "random",
)


def score(
    pair: ModelPair,
    behaviour: Behaviour,
    method: str = "weight_attribution",
    *,
    split: str | None = "train",
    batch_size: int = 8,
    positions: Positions = "all",
    candidates: NeuronSelection | None = None,
    groups_per_pass: int = 16,
    utility: Behaviour | None = None,
    utility_quantile: float = 0.05,
    contrast: float = 0.0,
    preserve: Sequence[Behaviour] = (),
    preserve_weight: float | Sequence[float] = 1.0,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
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
      if given), ``weight_diff``, ``nlsr_drift``, ``random`` (``seed``).

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
    the last ``k``. Scores are accumulated in fp32 whatever the models' dtype.

    Raises :class:`BehaviourSignalError` when the metric is NaN or identical on donor and target.

    Example:
        >>> from cnt_lens.testing import planted_pair
        >>> pair, behaviour, planted = planted_pair("llama", n_planted=6, seed=0)
        >>> s = score(pair, behaviour, progress=False)
        >>> s.top_k(planted.n).overlap(planted)
        1.0
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    if device is not None:
        pair.donor.to(device)
        pair.target.to(device)
    tok = model_tokenizer(pair.target)
    meta: dict[str, Any] = {"split": split, "positions": positions}
    if method in ("weight_diff", "nlsr_drift", "random"):
        values = {"weight_diff": lambda: baselines.weight_diff(pair), "nlsr_drift": lambda: baselines.nlsr_drift(pair),
                  "random": lambda: baselines.random_scores(pair, seed)}[method]()
        return NeuronScores(values, method, behaviour.name, 0, {**meta, "seed": seed} if method == "random" else meta)

    batches = behaviour.batches(tok, split, batch_size)
    if method in ("weight_attribution", "attribution"):
        kind = "weight" if method == "weight_attribution" else "activation"
        change, direction, n = attribution_scores(pair, behaviour, batches, kind=kind, positions=positions,
                                                  progress=progress)
        values = change * direction.sign
        if contrast:
            control = behaviour.control_batches(tok, split, batch_size)
            ctrl, ctrl_dir, _ = attribution_scores(pair, behaviour, control, kind=kind, positions=positions,
                                                   progress=progress)
            values = values - contrast * ctrl * direction.sign  # moving controls the same way counts against
            meta.update(contrast=contrast, control_metric_donor=ctrl_dir.donor, control_metric_target=ctrl_dir.target)
        weights = ([float(preserve_weight)] * len(preserve) if isinstance(preserve_weight, (int, float))
                   else [float(w) for w in preserve_weight])
        if len(weights) != len(preserve):
            raise ValueError(f"{len(weights)} preserve weights for {len(preserve)} preserved behaviours")
        for keep, weight in zip(preserve, weights):
            kept, _, _ = attribution_scores(pair, keep, keep.batches(tok, split, batch_size), kind=kind,
                                            positions=positions, progress=progress)
            values = values + weight * kept.clamp(max=0.0)  # − estimated harm to keep's metric only
            meta.setdefault("preserve", []).append(keep.name)
        if preserve:
            meta["preserve_weight"] = weights if len(weights) > 1 else weights[0]
    elif method in ("weight_patching", "activation_patching"):
        cand = candidates.mask if candidates is not None else torch.ones(pair.n_layers, pair.d_mlp, dtype=torch.bool)
        if cand.shape != (pair.n_layers, pair.d_mlp):
            raise ValueError(f"candidates must be [{pair.n_layers}, {pair.d_mlp}], got {tuple(cand.shape)}")
        cells = cand.nonzero()
        if len(cells) == 0:
            raise ValueError("candidates selects no neurons")
        groups = torch.zeros(len(cells), pair.n_layers, pair.d_mlp, dtype=torch.bool)
        groups[torch.arange(len(cells)), cells[:, 0], cells[:, 1]] = True
        mode = "weight" if method == "weight_patching" else "activation"
        effects, direction, n = patching_effects(pair, behaviour, batches, groups, mode=mode, positions=positions,
                                                 groups_per_pass=groups_per_pass, progress=progress)
        values = torch.full((pair.n_layers, pair.d_mlp), float("nan"))
        values[cells[:, 0], cells[:, 1]] = effects * direction.sign
        meta["n_candidates"] = len(cells)
    else:
        direction = measure_direction(pair, behaviour, batches)
        carrier = pair.donor if direction.sign > 0 else pair.target
        meta["computed_on"] = "donor" if direction.sign > 0 else "target"
        n = sum(len(b) for b in batches)

        def importance(beh: Behaviour) -> torch.Tensor:
            bs = beh.batches(tok, split, batch_size)
            if method == "wanda":
                return baselines.wanda(carrier, bs, pair.n_layers)
            if method == "snip":
                return baselines.snip(carrier, beh, bs, pair.n_layers)
            return baselines.activation_contrast(carrier, bs, beh.control_batches(tok, split, batch_size), pair.n_layers)

        values = importance(behaviour)
        if utility is not None and method in ("wanda", "snip"):
            values, k = baselines.exclude_utility(values, importance(utility), utility_quantile)
            meta.update(utility=utility.name, utility_quantile=utility_quantile, n_excluded=k)
    meta.update(metric_donor=direction.donor, metric_target=direction.target)
    if behaviour.toward is not None:
        meta["toward"] = direction.sign
    return NeuronScores(values, method, behaviour.name, n, meta)
