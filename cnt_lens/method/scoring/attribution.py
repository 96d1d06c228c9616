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

import logging
import math
import weakref
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from cnt_lens.behaviours.base import Behaviour
from cnt_lens.core.progress import progress_bar
from cnt_lens.data.tokens import Batch, SharedPrefix, split_shared_prefix
from cnt_lens.method.scoring.common import Direction, Hook, Positions, capture, forward, position_mask, require_batches
from cnt_lens.method.scoring.registry import Context, Scored
from cnt_lens.method.selection import hook_name
from cnt_lens.models.forward import Model, device_of, logits_and_cache, logits_of
from cnt_lens.models.neurons import is_streamed, mlp_hidden, w_out
from cnt_lens.models.pair import ModelPair

log = logging.getLogger(__name__)


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
    unchecked (:meth:`~cnt_lens.method.scoring.common.Direction.check` it where its sign is used: control and
    preserved prompts may well read the same on both models). The weight kind
    needs the donor's weights only: with ``donor_metric`` (its mean metric on these batches, known
    from an earlier call) the donor forward is skipped. A streamed donor
    (:class:`~cnt_lens.models.streamed.StreamedDonor`, weight kind only) is never run: its mean metric is NaN
    and ``behaviour.toward`` gives the direction.

    The weight kind over every position runs a prefix that every prompt of a batch shares (a chat
    template's system prompt) once per batch, its gradient summed over the rows
    (:func:`~cnt_lens.data.split_shared_prefix`): the same scores up to float rounding, at the cost of
    the rows' own tokens. The first such batch a target model is scored on is checked against a plain
    forward pass (:func:`_prefix_pass_agrees`); where its KV-cache path disagrees, it is scored without it.
    """
    require_batches(batches, "scored")
    if kind not in ("activation", "weight"):
        raise ValueError(f"kind must be 'activation' or 'weight', got {kind!r}")
    dev = device_of(pair.target)
    acc = torch.zeros(pair.n_layers, pair.d_mlp, dtype=torch.float32, device=dev)
    m_donor = m_target = 0.0
    n_items = 0
    run_donor = not (kind == "weight" and (donor_metric is not None or is_streamed(pair.donor)))
    share = kind == "weight" and positions == "all"  # a shared prefix once per batch
    for batch in progress_bar(batches, desc=f"{kind} attribution", leave=False, enabled=progress, min_total=2):
        batch = batch.to(dev)
        keep = behaviour.logits_to_keep(batch)
        split = split_shared_prefix(batch) if share and keep > 0 else None
        if split is not None and keep > split.tail.shape[1]:
            split = None  # the metric reads into the prefix
        if split is not None and not _prefix_pass_agrees(pair.target, behaviour, batch, split):
            share, split = False, None
        donor_sum, metric = _attribute_batch(pair, behaviour, batch, kind, position_mask(batch, positions), acc,
                                             run_donor, split)
        m_donor += donor_sum
        m_target += float(metric.sum())
        n_items += metric.numel()
    known = donor_metric if donor_metric is not None else m_donor / n_items
    direction = Direction(known, m_target / n_items, behaviour.toward)
    return acc.cpu() / n_items, direction, n_items


def _attribute_batch(pair: ModelPair, behaviour: Behaviour, batch: Batch, kind: str,
                     positions: Bool[Tensor, "batch pos"], acc: Float[Tensor, "n_layers d_mlp"],
                     run_donor: bool = True, split: SharedPrefix | None = None) -> tuple[float, Float[Tensor, " items"]]:
    """Add one batch's attribution to ``acc`` in place; return (donor metric sum, target metric per item).

    One donor forward (no gradients; skipped without ``run_donor``, weight kind only: NaN sum) and one
    target forward/backward whose gradient hooks do the accumulation layer by layer, so no layer's
    activations outlive its backward step. With ``split`` (weight kind, every position) each forward is
    two passes, the shared prefix's (one row) and the rest's (:func:`_split_logits`); the prefix's hooks
    see the gradient summed over the rows, which is its contribution to every row at once.
    """
    layers = list(range(pair.n_layers))
    donor_post: dict[int, Tensor] = {}
    if kind == "weight" and not run_donor:
        donor_sum = float("nan")  # weights only: no donor forward
    else:
        with torch.no_grad():
            hooks = capture(layers, "hook_post", donor_post) if kind == "activation" else []
            logits = (forward(pair.donor, batch, behaviour, hooks) if split is None
                      else _split_logits(pair.donor, batch, behaviour, split))
            donor_sum = float(behaviour.metric(logits, batch).float().sum())

    def target_hooks(pos: Float[Tensor, "rows pos 1"]) -> list[Hook]:
        xs: dict[int, Tensor] = {}  # one store per pass: the prefix's and the rest's hooks fire apart
        hooks_t: list[Hook] = [("hook_embed", _embed_requires_grad)]
        if kind == "weight":
            hooks_t += capture(layers, "hook_in", xs)
        return hooks_t + _accumulating_hooks(pair, kind, pos, acc, donor_post, xs)

    with torch.enable_grad():
        if split is None:
            logits = forward(pair.target, batch, behaviour, target_hooks(positions.unsqueeze(-1).float()))
        else:
            logits = _split_logits(pair.target, batch, behaviour, split,
                                   target_hooks(split.head.new_ones(1, split.width, 1).float()),
                                   target_hooks(split.tail_mask.unsqueeze(-1).float()))
        metric = behaviour.metric(logits, batch).float()
        metric.sum().backward()
    return donor_sum, metric.detach()


def _split_logits(model: Model, batch: Batch, behaviour: Behaviour, split: SharedPrefix, head_hooks: Sequence[Hook] = (),
                  tail_hooks: Sequence[Hook] = ()) -> Float[Tensor, "batch kept vocab"]:
    """``forward(model, batch, behaviour)``'s logits from the prefix pass (one row, KV cache kept) and the rest's.

    The prefix's cache is repeated over the rows (differentiably: its gradient is the rows' sum) and
    the rest runs on it with the moved padding and each row's own positions.
    """
    _, cache = logits_and_cache(model, split.head, {}, head_hooks, keep=1)
    cache.batch_repeat_interleave(len(batch))
    kwargs = {"attention_mask": split.mask, "position_ids": split.positions, "past_key_values": cache}
    return logits_of(model, split.tail, kwargs, tail_hooks, keep=behaviour.logits_to_keep(batch))


_PREFIX_PASS_CHECKED: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def _prefix_pass_agrees(model: Model, behaviour: Behaviour, batch: Batch, split: SharedPrefix) -> bool:
    """Whether the two-pass forward gives the plain forward's metric on ``batch`` (warns where it does not).

    Checked on the first such batch ``model`` is scored on, then remembered for the model object (a
    patch changes its weights, not its code path). A KV-cache path can break with a library release
    (transformers 5.24 did, through the bridge); the scores then come from the plain pass, which costs
    the shared prefix's share of the time again.
    """
    if model in _PREFIX_PASS_CHECKED:
        return _PREFIX_PASS_CHECKED[model]
    with torch.no_grad():
        logits = forward(model, batch, behaviour)
        plain = behaviour.metric(logits, batch).float()
        two = behaviour.metric(_split_logits(model, batch, behaviour, split), batch).float()
    gap = float((plain - two).abs().max())
    rel = 1e-3 if logits.dtype in (torch.float32, torch.float64) else 5e-2  # half precision: its own rounding
    _PREFIX_PASS_CHECKED[model] = ok = gap <= rel * max(1.0, float(plain.abs().max()))
    if not ok:
        log.warning("scoring: running the shared prompt prefix once gives a metric %.3g away from the plain forward "
                    "pass (the model's KV-cache path); scoring without it", gap)
    return ok


def _donor_terms(donor: Any, layer: int, x: Float[Tensor, "batch pos d_model"],
                 ) -> tuple[Float[Tensor, "batch pos d_mlp"], Float[Tensor, "d_mlp d_model"]]:
    """The donor's MLP activations for the target's MLP input ``x``, and its ``W_out`` (one disk read if streamed)."""
    if is_streamed(donor):
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
