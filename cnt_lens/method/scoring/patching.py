"""Exact patching: run the target with a group of neurons patched and measure the metric change.

Two modes, one mechanism (replicate the batch once per group, patch each replica's group in a hook):

* ``mode="activation"`` — the donor's activations are written into the group at ``hook_post``
  (classic activation patching, the ground truth of activation attribution);
* ``mode="weight"`` — the group's exact weight transplant: at ``hook_out`` the MLP output gets
  ``(ã ⊙ g) W_out^d − (a ⊙ g) W_out^t``, with ``ã`` the donor's neurons on the target's MLP input.
  For a group inside one layer this equals copying those neurons' weights (tested), but many
  groups share one forward pass.

A group may span layers; each replica's hooks patch its neurons wherever they are. Effects are
mean metric changes per prompt (raw: + = the metric rises).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from cnt_lens.behaviours.base import Behaviour
from cnt_lens.core.progress import progress_bar
from cnt_lens.data.tokens import Batch
from cnt_lens.method.scoring.common import Direction, Hook, Positions, capture, forward, position_mask, require_batches
from cnt_lens.method.scoring.registry import Context, Scored
from cnt_lens.method.selection import NeuronSelection, hook_name
from cnt_lens.models.forward import device_of
from cnt_lens.models.neurons import mlp_hidden, w_out
from cnt_lens.models.pair import ModelPair


def _patch_hooks(
    pair: ModelPair,
    groups: Bool[Tensor, "groups n_layers d_mlp"],
    batch_rows: int,
    pos: Bool[Tensor, "batch pos"],
    mode: str,
    donor_post: dict[int, Tensor],
) -> list[Hook]:
    """Hooks that patch replica ``r`` (rows ``r*batch_rows …``) with the neurons of ``groups[r]``."""
    hooks: list[Hook] = []
    n_groups = groups.shape[0]
    xs: dict[int, Tensor] = {}
    for layer in groups.any(dim=(0, 2)).nonzero().squeeze(-1).tolist():
        g = groups[:, layer]  # [groups d_mlp]
        reps = g.any(-1).nonzero().squeeze(-1)  # replicas that patch this layer

        def split(t: Tensor) -> Tensor:  # [groups*batch, pos, d] → [groups, batch, pos, d]
            return t.view(n_groups, batch_rows, *t.shape[1:])

        if mode == "activation":

            def post_hook(a: Tensor, hook: Any, layer: int = layer, g: Tensor = g, reps: Tensor = reps) -> Tensor:
                a4 = split(a).clone()
                m = g[reps][:, None, None, :] & pos[None, :, :, None]
                a4[reps] = torch.where(m, donor_post[layer][None].to(a.dtype), a4[reps])
                return a4.view_as(a)

            hooks.append((hook_name(layer, "hook_post"), post_hook))
        else:
            hooks += capture([layer], "hook_in", xs)

            def out_hook(out: Tensor, hook: Any, layer: int = layer, g: Tensor = g, reps: Tensor = reps) -> Tensor:
                x = split(xs[layer])[reps]  # [reps batch pos d_model]
                mask = (g[reps][:, None, None, :] & pos[None, :, :, None]).to(x.dtype)
                a_t = mlp_hidden(pair.target, layer, x) * mask
                a_d = mlp_hidden(pair.donor, layer, x) * mask
                delta = a_d @ w_out(pair.donor, layer).to(x.dtype) - a_t @ w_out(pair.target, layer).to(x.dtype)
                o4 = split(out).clone()
                o4[reps] = o4[reps] + delta.to(out.dtype)
                return o4.view_as(out)

            hooks.append((hook_name(layer, "hook_out"), out_hook))
    return hooks


def patching_effects(
    pair: ModelPair,
    behaviour: Behaviour,
    batches: list[Batch],
    groups: Bool[Tensor, "groups n_layers d_mlp"],
    *,
    mode: Literal["activation", "weight"] = "weight",
    positions: Positions = "all",
    groups_per_pass: int = 16,
    progress: bool = True,
) -> tuple[Float[Tensor, " groups"], Direction, int]:
    """Exact effect of patching each group: (mean metric change per prompt, direction, n_items)."""
    require_batches(batches, "scored")
    if mode not in ("activation", "weight"):
        raise ValueError(f"mode must be 'activation' or 'weight', got {mode!r}")
    groups = torch.as_tensor(groups).bool()
    if groups.dim() != 3 or tuple(groups.shape[1:]) != (pair.n_layers, pair.d_mlp):
        raise ValueError(f"groups must be [groups, {pair.n_layers}, {pair.d_mlp}], got {tuple(groups.shape)}")
    if groups_per_pass < 1:
        raise ValueError("groups_per_pass must be ≥ 1")
    dev = device_of(pair.target)
    groups_dev = groups.to(dev)
    effects = torch.zeros(groups.shape[0], dtype=torch.float32)
    # Group order by first layer keeps each pass's hooks to few layers.
    first_layer = groups.any(-1).float().argmax(-1)
    order = first_layer.argsort(stable=True)
    layers_needed = groups.any(dim=(0, 2)).nonzero().squeeze(-1).tolist()
    m_donor = m_target = 0.0
    n_items = 0
    n_passes = len(batches) * ((groups.shape[0] + groups_per_pass - 1) // groups_per_pass)
    bar = progress_bar(total=n_passes, desc=f"{mode} patching", leave=False, enabled=progress, min_total=2)
    with torch.no_grad():
        for batch in batches:
            batch = batch.to(dev)
            pos = position_mask(batch, positions)
            donor_post: dict[int, Tensor] = {}
            hooks = capture(layers_needed, "hook_post", donor_post) if mode == "activation" else []
            m_donor += float(behaviour.metric(forward(pair.donor, batch, behaviour, hooks), batch).float().sum())
            clean = behaviour.metric(forward(pair.target, batch, behaviour), batch).float()
            m_target += float(clean.sum())
            n_items += clean.numel()
            for lo in range(0, groups.shape[0], groups_per_pass):
                idx = order[lo:lo + groups_per_pass]
                chunk = groups_dev[idx.to(dev)]
                rows = len(batch)
                hooks = _patch_hooks(pair, chunk, rows, pos, mode, donor_post)
                logits = forward(pair.target, batch.repeat(len(idx)), behaviour, hooks)
                # Metrics may pair rows inside a batch (stereotype vs anti), so take them per replica.
                patched = torch.stack([behaviour.metric(chunk_logits, batch).float()
                                       for chunk_logits in logits.split(rows)])
                per_group = (patched - clean.view(1, -1)).sum(-1)
                effects[idx] += per_group.cpu()
                bar.update(1)
    bar.close()
    direction = Direction(m_donor / n_items, m_target / n_items, behaviour.toward)
    direction.check(behaviour.name)
    return effects / n_items, direction, n_items


def patching_family(ctx: Context, *, mode: Literal["activation", "weight"], candidates: NeuronSelection | None = None,
                    groups_per_pass: int = 16) -> Scored:
    """Exact effect of patching each ``candidates`` neuron alone, signed toward the donor.

    All neurons by default (others get NaN); ``groups_per_pass`` neurons per forward pass.
    """
    pair = ctx.pair
    cand = candidates.mask if candidates is not None else torch.ones(pair.n_layers, pair.d_mlp, dtype=torch.bool)
    if cand.shape != (pair.n_layers, pair.d_mlp):
        raise ValueError(f"candidates must be [{pair.n_layers}, {pair.d_mlp}], got {tuple(cand.shape)}")
    cells = cand.nonzero()
    if len(cells) == 0:
        raise ValueError("candidates selects no neurons")
    groups = torch.zeros(len(cells), pair.n_layers, pair.d_mlp, dtype=torch.bool)
    groups[torch.arange(len(cells)), cells[:, 0], cells[:, 1]] = True
    effects, direction, n = patching_effects(pair, ctx.behaviour, ctx.batches(), groups, mode=mode,
                                             positions=ctx.positions, groups_per_pass=groups_per_pass,
                                             progress=ctx.progress)
    values = torch.full((pair.n_layers, pair.d_mlp), float("nan"))
    values[cells[:, 0], cells[:, 1]] = effects * direction.sign
    return Scored(values, n, {"n_candidates": len(cells)}, direction)
