"""Attribution patching: first-order estimates of every neuron's transplant effect, all at once.

Two estimates, one pass each (a donor forward, a target forward and backward per batch, summed
batch by batch, so memory does not grow with the number of prompts):

* ``kind="activation"`` — the classic attribution patch (Nanda 2023; CNT's scorer)::

      score_i = Σ_prompts,pos ∂m/∂a_i · (a_i^donor − a_i^target)

  estimating what writing the donor's *activation* into neuron ``i`` does.

* ``kind="weight"`` — what copying neuron ``i``'s *weights* does, which is what a transplant is.
  The copied neuron reads the target's residual stream ``x`` and writes through the donor's
  output row, so its change to the MLP output is ``ã_i W_out^d[i] − a_i W_out^t[i]`` with
  ``ã_i = mlp_d(x)_i`` (donor input weights applied to the target's MLP input)::

      score_i = Σ_prompts,pos ∂m/∂out · (ã_i W_out^d[i] − a_i W_out^t[i])

  It sees changes in a neuron's output row, which activation attribution cannot (it reads the
  target's row only), and it is exact to first order in the weight change at that layer.

Gradients come from backward hooks at ``hook_post`` (∂m/∂a) and, for the weight kind,
``hook_out`` (∂m/∂out); contributions are summed inside the hooks, so nothing per-token is kept
beyond the layer being processed.
Scores are the estimated change of the mean metric per prompt (raw: + = the metric rises);
:func:`~cnt_lens.score` orients them toward the donor.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..behaviours import Behaviour
from ..data import Batch
from ..models import ModelPair, _streamed, device_of, hook_name, mlp_hidden, w_out
from ..progress import progress_bar
from .common import Direction, Hook, Positions, capture, forward, position_mask, require_batches
from .registry import Context, Scored


def _embed_requires_grad(x: Tensor, hook: Any) -> Tensor:
    # Weights are frozen; a leaf at the embeddings makes autograd build the graph through every layer.
    return x.detach().requires_grad_(True)


def attribution_scores(
    pair: ModelPair,
    behaviour: Behaviour,
    batches: list[Batch],
    *,
    kind: Literal["activation", "weight"] = "weight",
    positions: Positions = "all",
    donor_metric: float | None = None,
    progress: bool = True,
) -> tuple[Float[Tensor, "n_layers d_mlp"], Direction, int]:
    """Per-neuron attribution over ``batches``: (estimated mean metric change per prompt, direction, n_items).

    The direction (donor vs target mean metric) comes free from the two forwards; it is returned
    unchecked (:meth:`~cnt_lens.scoring.common.Direction.check` it where its sign is used: control and
    preserved prompts may well read the same on both models). The weight kind
    needs the donor's weights only: with ``donor_metric`` (its mean metric on these batches, known
    from an earlier call) the donor forward is skipped. A streamed donor
    (:class:`~cnt_lens.streamed.StreamedDonor`, weight kind only) is never run: its mean metric is NaN
    and ``behaviour.toward`` gives the direction.
    """
    require_batches(batches, "scored")
    if kind not in ("activation", "weight"):
        raise ValueError(f"kind must be 'activation' or 'weight', got {kind!r}")
    dev = device_of(pair.target)
    acc = torch.zeros(pair.n_layers, pair.d_mlp, dtype=torch.float32, device=dev)
    m_donor = m_target = 0.0
    n_items = 0
    run_donor = not (kind == "weight" and (donor_metric is not None or _streamed(pair.donor)))
    for batch in progress_bar(batches, desc=f"{kind} attribution", leave=False, enabled=progress, min_total=2):
        batch = batch.to(dev)
        donor_sum, metric = _attribute_batch(pair, behaviour, batch, kind, position_mask(batch, positions), acc,
                                             run_donor)
        m_donor += donor_sum
        m_target += float(metric.sum())
        n_items += metric.numel()
    known = donor_metric if donor_metric is not None else m_donor / n_items
    direction = Direction(known, m_target / n_items, behaviour.toward)
    return acc.cpu() / n_items, direction, n_items


def _attribute_batch(pair: ModelPair, behaviour: Behaviour, batch: Batch, kind: str,
                     positions: Bool[Tensor, "batch pos"], acc: Float[Tensor, "n_layers d_mlp"],
                     run_donor: bool = True) -> tuple[float, Float[Tensor, " items"]]:
    """Add one batch's attribution to ``acc`` in place; return (donor metric sum, target metric per item).

    One donor forward (no gradients; skipped without ``run_donor``, weight kind only: NaN sum) and one
    target forward/backward whose gradient hooks do the accumulation layer by layer, so no layer's
    activations outlive its backward step.
    """
    layers = list(range(pair.n_layers))
    donor_post: dict[int, Tensor] = {}
    if kind == "weight" and not run_donor:
        donor_sum = float("nan")  # weights only: no donor forward
    else:
        with torch.no_grad():
            hooks = capture(layers, "hook_post", donor_post) if kind == "activation" else []
            donor_sum = float(behaviour.metric(forward(pair.donor, batch, behaviour, hooks), batch).float().sum())
    xs: dict[int, Tensor] = {}
    hooks_t: list[Hook] = [("hook_embed", _embed_requires_grad)]
    if kind == "weight":
        hooks_t += capture(layers, "hook_in", xs)
    hooks_t += _accumulating_hooks(pair, kind, positions.unsqueeze(-1).float(), acc, donor_post, xs)
    with torch.enable_grad():
        metric = behaviour.metric(forward(pair.target, batch, behaviour, hooks_t), batch).float()
        metric.sum().backward()
    return donor_sum, metric.detach()


def _donor_terms(donor: Any, layer: int, x: Float[Tensor, "batch pos d_model"],
                 ) -> tuple[Float[Tensor, "batch pos d_mlp"], Float[Tensor, "d_mlp d_model"]]:
    """The donor's MLP activations for the target's MLP input ``x``, and its ``W_out`` (one disk read if streamed)."""
    if _streamed(donor):
        return donor.mlp_terms(layer, x)
    return mlp_hidden(donor, layer, x), w_out(donor, layer)


def _accumulating_hooks(pair: ModelPair, kind: str, pos: Float[Tensor, "batch pos 1"],
                        acc: Float[Tensor, "n_layers d_mlp"], donor_post: dict[int, Tensor],
                        xs: dict[int, Tensor]) -> list[Hook]:
    """Forward hooks on every layer's ``hook_post``/``hook_out`` whose gradient hooks add to ``acc``.

    Both forward hooks return their input: where the bridge shows a hook a reshaped view (OPT's
    flattened MLP), only a returned tensor is put back on the path the forward takes, so only then
    does its gradient hook fire.
    """
    posts: dict[int, Tensor] = {}
    g_outs: dict[int, Tensor] = {}

    def on_post_grad(layer: int, grad_a: Tensor) -> None:
        # ∂m/∂a arrives after ∂m/∂out of the same layer (backward runs downstream first).
        grad_a, a_t = grad_a.float(), posts.pop(layer).float()
        if kind == "activation":
            contrib = grad_a * (donor_post.pop(layer).float() - a_t)
        else:
            with torch.no_grad():
                a_tilde, out_d = _donor_terms(pair.donor, layer, xs.pop(layer))
            contrib = a_tilde.float() * (g_outs.pop(layer) @ out_d.float().T) - a_t * grad_a
        acc[layer] += (contrib * pos).sum((0, 1))

    def layer_hooks(layer: int) -> list[Hook]:
        def post(a: Tensor, hook: Any) -> Tensor:
            posts[layer] = a.detach()
            if a.requires_grad:
                a.register_hook(lambda g: on_post_grad(layer, g))
            return a

        def out(o: Tensor, hook: Any) -> Tensor:
            if kind == "weight" and o.requires_grad:
                o.register_hook(lambda g: g_outs.__setitem__(layer, g.float()))
            return o

        return [(hook_name(layer, "hook_post"), post), (hook_name(layer, "hook_out"), out)]

    return [h for layer in range(pair.n_layers) for h in layer_hooks(layer)]


def attribution_family(ctx: Context, *, kind: Literal["activation", "weight"], contrast: float = 0.0,
                       preserve: Sequence[Behaviour] = (), preserve_weight: float | Sequence[float] = 1.0,
                       donor_metrics: dict[str, float] | None = None) -> Scored:
    """Attribution scores, signed toward the donor.

    ``kind``: ``weight`` = weight attribution, ``activation`` = classic; ``contrast`` × the same estimate
    on the control prompts subtracted; each ``preserve`` behaviour's estimated harm (``min(effect, 0)``)
    added with its ``preserve_weight`` (see :func:`cnt_lens.score`). ``donor_metrics``: a dict shared
    by calls on the same donor and prompts (re-scoring rounds: only the target changes); the weight
    kind fills it with the donor's mean metrics on first use and skips the donor forwards after.
    """
    pair, behaviour = ctx.pair, ctx.behaviour

    def attribute(b: Behaviour, batches: list[Batch], key: str) -> tuple[Tensor, Direction, int]:
        known = None if donor_metrics is None or kind != "weight" else donor_metrics.get(f"{key}:{b.name}")
        out = attribution_scores(pair, b, batches, kind=kind, positions=ctx.positions, donor_metric=known,
                                 progress=ctx.progress)
        if donor_metrics is not None and kind == "weight" and not math.isnan(out[1].donor):
            donor_metrics[f"{key}:{b.name}"] = out[1].donor
        return out

    change, direction, n = attribute(behaviour, ctx.batches(), "behaviour")
    direction.check(behaviour.name)
    values, meta = change * direction.sign, {}
    if contrast:
        ctrl, ctrl_dir, _ = attribute(behaviour, ctx.control_batches(), "control")
        values = values - contrast * ctrl * direction.sign  # moving controls the same way counts against
        meta.update(contrast=contrast, control_metric_donor=ctrl_dir.donor, control_metric_target=ctrl_dir.target)
    weights = ([float(preserve_weight)] * len(preserve) if isinstance(preserve_weight, (int, float))
               else [float(w) for w in preserve_weight])
    if len(weights) != len(preserve):
        raise ValueError(f"{len(weights)} preserve weights for {len(preserve)} preserved behaviours")
    for keep, weight in zip(preserve, weights):
        kept, _, _ = attribute(keep, ctx.batches(keep), "preserve")
        values = values + weight * kept.clamp(max=0.0)  # − estimated harm to keep's metric only
        meta.setdefault("preserve", []).append(keep.name)
    if preserve:
        meta["preserve_weight"] = weights if len(weights) > 1 else weights[0]
    return Scored(values, n, meta, direction)
