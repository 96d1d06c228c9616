"""The selection rules the papers compare against, behind the same interface.

* ``weight_diff`` — ‖w_donor − w_target‖ over all of a neuron's weights (no data).
* ``nlsr_drift`` — NLSR (Yi et al., AAAI 2025): 1 − cos(w_donor, w_target) of a neuron's
  concatenated weights; the neurons that drifted most between reference and fine-tuned model.
* ``activation_contrast`` — SafetyNeuron-style (Chen et al. 2024): |mean activation on behaviour
  prompts − on control prompts| in the model that has the behaviour.
* ``wanda`` — Σ |W|·‖input‖ over a neuron's weights (Sun et al. 2023; Wei et al. 2024).
* ``snip`` — Σ |W ⊙ ∂m/∂W| over a neuron's weights (Lee et al. 2019; Wei et al. 2024).
* ``random`` — seeded uniform scores.

Importance baselines (contrast, Wanda, SNIP) are computed on the model that *has* more of the
behaviour: the donor for function addition, the target for deletion. With a ``utility``
behaviour they apply Wei et al.'s set difference: neurons in the top ``utility_quantile`` of the
same importance on utility data are excluded (score NaN).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from cnt_lens.behaviours.base import Behaviour
from cnt_lens.data.tokens import Batch
from cnt_lens.method.scoring.common import Direction, capture, forward, measure_direction, require_batches
from cnt_lens.method.scoring.registry import Context, Scored
from cnt_lens.models.forward import Model, device_of, logits_of
from cnt_lens.models.neurons import DonorWeights, neuron_params
from cnt_lens.models.pair import ModelPair


def _neuron_vectors(model: Model | DonorWeights, layer: int) -> Float[Tensor, "d_mlp n_weights"]:
    """All of each neuron's weights of ``layer`` concatenated, one row per neuron."""
    return torch.cat([p.tensor.detach().float().movedim(p.axis, 0).reshape(p.tensor.shape[p.axis], -1)
                      for p in neuron_params(model, layer)], dim=1)


def weight_diff(pair: ModelPair) -> Float[Tensor, "n_layers d_mlp"]:
    """‖w_donor − w_target‖ over each neuron's weight entries (every role)."""
    return torch.stack([(_neuron_vectors(pair.donor, layer) - _neuron_vectors(pair.target, layer)).norm(dim=1)
                        for layer in range(pair.n_layers)]).cpu()


def nlsr_drift(pair: ModelPair) -> Float[Tensor, "n_layers d_mlp"]:
    """NLSR-style drift: 1 − cosine similarity of each neuron's donor and target weights."""
    return torch.stack([1 - torch.nn.functional.cosine_similarity(_neuron_vectors(pair.donor, layer),
                                                                 _neuron_vectors(pair.target, layer), dim=1)
                        for layer in range(pair.n_layers)]).cpu()


def random_scores(pair: ModelPair, seed: int = 0) -> Float[Tensor, "n_layers d_mlp"]:
    """Uniform random scores from ``seed`` (the same seed gives the same scores)."""
    return torch.rand(pair.n_layers, pair.d_mlp, generator=torch.Generator().manual_seed(seed))


def activation_contrast(model: Model, behaviour_batches: list[Batch], control_batches: list[Batch],
                        n_layers: int) -> Float[Tensor, "n_layers d_mlp"]:
    """Mean activation on behaviour prompts minus on control prompts, per neuron."""
    require_batches(behaviour_batches, "behaviour")
    require_batches(control_batches, "control")
    means = []
    for batches in (behaviour_batches, control_batches):
        total, count = 0.0, 0.0
        for b in batches:
            b = b.to(device_of(model))
            posts: dict[int, Tensor] = {}
            with torch.no_grad():  # activations only: one position's logits is the least a forward computes
                logits_of(model, b.tokens, b.model_kwargs(), capture(list(range(n_layers)), "hook_post", posts), keep=1)
            m = b.attention_mask.float()[..., None]
            total = total + torch.stack([(posts[layer].float() * m).sum((0, 1)) for layer in range(n_layers)])
            count += float(m.sum())
        means.append(total / count)
    return (means[0] - means[1]).abs().cpu()


def wanda(model: Model, batches: list[Batch], n_layers: int) -> Float[Tensor, "n_layers d_mlp"]:
    """Σ_j |W_in[j,i]|·‖x_j‖ (and W_gate) + ‖a_i‖·Σ_j |W_out[i,j]|, norms over all real tokens."""
    require_batches(batches, "behaviour")
    layers = list(range(n_layers))
    sq_x: dict[int, Tensor] = {}
    sq_a: dict[int, Tensor] = {}
    for b in batches:
        b = b.to(device_of(model))
        xs: dict[int, Tensor] = {}
        posts: dict[int, Tensor] = {}
        with torch.no_grad():  # activations only
            logits_of(model, b.tokens, b.model_kwargs(), capture(layers, "hook_in", xs) + capture(layers, "hook_post", posts),
                      keep=1)
        m = b.attention_mask.float()[..., None]
        for layer in layers:
            sq_x[layer] = sq_x.get(layer, 0) + (xs[layer].float() ** 2 * m).sum((0, 1))
            sq_a[layer] = sq_a.get(layer, 0) + (posts[layer].float() ** 2 * m).sum((0, 1))
    out = []
    for layer in layers:
        nx, na = sq_x[layer].sqrt(), sq_a[layer].sqrt()
        s = torch.zeros_like(na)
        for p in neuron_params(model, layer):
            w = p.tensor.detach().float().movedim(p.axis, 0).abs()  # [d_mlp, ...]
            if p.role in ("W_in", "W_gate"):
                s = s + w @ nx
            elif p.role == "W_out":
                s = s + na * w.sum(-1)
        out.append(s)
    return torch.stack(out).cpu()


def snip(model: Model, behaviour: Behaviour, batches: list[Batch], n_layers: int) -> Float[Tensor, "n_layers d_mlp"]:
    """Σ |W ⊙ ∂(Σ metric)/∂W| over each neuron's weights (gradients summed over the batches)."""
    require_batches(batches, "behaviour")
    params = [p for layer in range(n_layers) for p in neuron_params(model, layer)]
    for p in params:
        p.tensor.requires_grad_(True)
        p.tensor.grad = None
    try:
        for b in batches:
            b = b.to(device_of(model))
            with torch.enable_grad():
                behaviour.metric(forward(model, b, behaviour), b).float().sum().backward()
        out = []
        for layer in range(n_layers):
            s = 0
            for p in neuron_params(model, layer):
                prod = (p.tensor.detach().float() * p.tensor.grad.float()).abs().movedim(p.axis, 0)
                s = s + prod.reshape(prod.shape[0], -1).sum(-1)
            out.append(s)
        return torch.stack(out).cpu()
    finally:
        for p in params:
            p.tensor.grad = None
            p.tensor.requires_grad_(False)


def exclude_utility(scores: Tensor, utility_scores: Tensor, quantile: float) -> tuple[Tensor, int]:
    """Wei et al.'s set difference: NaN out neurons in the top ``quantile`` of utility importance."""
    k = max(1, round(quantile * utility_scores.numel()))
    top = torch.zeros(utility_scores.numel(), dtype=torch.bool)
    top[utility_scores.flatten().topk(k).indices] = True
    out = scores.clone()
    out.view(-1)[top] = float("nan")
    return out, k


def _carrier(ctx: Context) -> tuple[Any, Direction, int, dict[str, Any]]:
    """The model that has more of the behaviour (donor for addition, target for deletion), and the direction."""
    batches = ctx.batches()
    direction = measure_direction(ctx.pair, ctx.behaviour, batches)
    on_donor = direction.sign > 0
    return (ctx.pair.donor if on_donor else ctx.pair.target, direction, sum(len(b) for b in batches),
            {"computed_on": "donor" if on_donor else "target"})


def _importance(rule: str, ctx: Context, carrier: Any, behaviour: Behaviour) -> Float[Tensor, "n_layers d_mlp"]:
    if rule == "wanda":
        return wanda(carrier, ctx.batches(behaviour), ctx.pair.n_layers)
    if rule == "snip":
        return snip(carrier, behaviour, ctx.batches(behaviour), ctx.pair.n_layers)
    raise ValueError(f"unknown importance rule {rule!r}")


def importance_family(ctx: Context, *, rule: str, utility: Behaviour | None = None,
                      utility_quantile: float = 0.05) -> Scored:
    """Wanda or SNIP importance on the carrier model.

    With ``utility``, Wei et al.'s set difference: neurons in the top ``utility_quantile`` of the
    same importance on utility data get NaN.
    """
    carrier, direction, n, meta = _carrier(ctx)
    values = _importance(rule, ctx, carrier, ctx.behaviour)
    if utility is not None:
        values, k = exclude_utility(values, _importance(rule, ctx, carrier, utility), utility_quantile)
        meta.update(utility=utility.name, utility_quantile=utility_quantile, n_excluded=k)
    return Scored(values, n, meta, direction)


def contrast_family(ctx: Context) -> Scored:
    """|mean activation on behaviour prompts − on control prompts| on the carrier model (SafetyNeuron-style)."""
    carrier, direction, n, meta = _carrier(ctx)
    return Scored(activation_contrast(carrier, ctx.batches(), ctx.control_batches(), ctx.pair.n_layers), n, meta,
                  direction)


def weight_rule_family(ctx: Context, *, rule: str) -> Scored:
    """A data-free rule on the two models' weights: ``weight_diff`` or ``nlsr_drift``."""
    rules = {"weight_diff": weight_diff, "nlsr_drift": nlsr_drift}
    return Scored(rules[rule](ctx.pair))


def random_family(ctx: Context, *, seed: int = 0) -> Scored:
    """Seeded uniform scores: the floor every method must beat."""
    return Scored(random_scores(ctx.pair, seed), meta={"seed": seed})
