"""Some neurons' activations over every token of every text: what the neuron cards and the neuron browser read.

One forward per batch that stops after the deepest layer read (no later block, one position unembedded), and
a prefix every row of a batch shares — a chat template's system prompt — runs once, its KV cache repeated over
the rows (:func:`~cnt_lens.data.split_shared_prefix`). Each row's activations are its own text's either way,
up to float rounding; the first shared-prefix batch of a model is checked against the plain pass.
"""

from __future__ import annotations

import logging
import weakref
from functools import partial
from typing import Any

import torch
from jaxtyping import Float, Int

from cnt_lens.data.tokens import Batch, SharedPrefix, split_shared_prefix
from cnt_lens.method.selection import hook_name
from cnt_lens.models.forward import Model, device_of, logits_and_cache, logits_of

__all__ = ["sequence_activations"]

log = logging.getLogger(__name__)

Neurons = list[tuple[int, int]]
"""(layer, index) pairs, in the order their activation columns come back."""


def sequence_activations(model: Model, batches: list[Batch], neurons: Neurons
                         ) -> tuple[list[list[int]], list[Float[torch.Tensor, "pos n"]]]:
    """``hook_post`` activations of ``neurons`` over left-padded ``batches``: each text's real token ids and ``[pos, n]``.

    ``n`` follows the order of ``neurons``. The pass stops after the deepest of their layers; when that is
    the last layer only one position is unembedded (the unembedding of every position is a large share of a
    small model's forward pass). A prefix every row shares runs once per batch (module docstring) when the
    pass reaches past half the layers: the prefix's own pass runs them all, since its cache must cover them.
    """
    layers = sorted({layer for layer, _ in neurons})
    grouped = {x: i for i, x in enumerate((layer, n) for layer in layers for lay, n in neurons if lay == layer)}
    pick = [grouped[tuple(x)] for x in neurons]  # column of each neuron in the layer-grouped capture
    deep = 2 * (layers[-1] + 1) >= model.cfg.n_layers  # the prefix's own pass runs every layer: it pays off deep
    seqs: list[list[int]] = []
    acts: list[torch.Tensor] = []
    for b in batches:
        b = b.to(device_of(model))
        split = split_shared_prefix(b) if deep else None
        if split is None or _SPLIT_CHECKED.get(model) is False:
            tokens, mask, a = _plain(model, b, neurons)
        elif model in _SPLIT_CHECKED:
            tokens, mask, a = _shared(model, b, split, neurons)
        else:  # a model's first shared batch: both passes, compared; the plain one is kept
            tokens, mask, a = _checked(model, b, split, neurons)
        a = a[..., pick]
        for row in range(len(b)):
            seqs.append(tokens[row][mask[row]].tolist())
            acts.append(a[row][mask[row]])
    return seqs, acts


def _capture(model: Model, tokens: Int[torch.Tensor, "batch pos"], kwargs: dict[str, Any], neurons: Neurons,
             with_cache: bool = False) -> tuple[Float[torch.Tensor, "batch pos n"], Any]:
    """Layer-grouped activations of ``neurons`` on ``tokens`` (CPU, fp32), and the KV cache if ``with_cache``.

    Without the cache the pass stops after the deepest layer read; with it the pass runs whole (its cache
    must cover every layer a later pass reads).
    """
    layers = sorted({layer for layer, _ in neurons})
    cols = {layer: [n for lay, n in neurons if lay == layer] for layer in layers}
    store: dict[int, torch.Tensor] = {}

    def keep(x: torch.Tensor, hook: Any, layer: int) -> None:
        store[layer] = x[..., cols[layer]].detach().float().cpu()  # [batch, pos, neurons of this layer]

    hooks = [(hook_name(layer, "hook_post"), partial(keep, layer=layer)) for layer in layers]
    cache = None
    with torch.no_grad():
        if with_cache:
            _, cache = logits_and_cache(model, tokens, kwargs, hooks, keep=1)
        else:
            stop = layers[-1] + 1 if layers[-1] + 1 < model.cfg.n_layers else None  # no later block, no unembedding
            logits_of(model, tokens, {**kwargs, "stop_at_layer": stop}, hooks, keep=1)
    return torch.cat([store[layer] for layer in layers], dim=-1), cache


def _plain(model: Model, b: Batch, neurons: Neurons
           ) -> tuple[Int[torch.Tensor, "batch pos"], torch.Tensor, Float[torch.Tensor, "batch pos n"]]:
    """(tokens, real-token mask, activations) of ``b`` from one pass over every row's every token."""
    a, _ = _capture(model, b.tokens, b.model_kwargs(), neurons)
    return b.tokens.cpu(), b.attention_mask.bool().cpu(), a


def _shared(model: Model, b: Batch, split: SharedPrefix, neurons: Neurons
            ) -> tuple[Int[torch.Tensor, "batch pos"], torch.Tensor, Float[torch.Tensor, "batch pos n"]]:
    """:func:`_plain`'s three, laid out ``[prefix | pad | rest]``: the prefix's pass (one row) and the rest's on its cache."""
    head, cache = _capture(model, split.head, {}, neurons, with_cache=True)  # [1, width, n]
    cache.batch_repeat_interleave(len(b))
    tail, _ = _capture(model, split.tail, {"attention_mask": split.mask, "position_ids": split.positions,
                                           "past_key_values": cache}, neurons)
    tokens = torch.cat([split.head.expand(len(b), -1), split.tail], 1).cpu()
    return tokens, split.mask.bool().cpu(), torch.cat([head.expand(len(b), -1, -1), tail], 1)


_SPLIT_CHECKED: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def _checked(model: Model, b: Batch, split: SharedPrefix, neurons: Neurons
             ) -> tuple[Int[torch.Tensor, "batch pos"], torch.Tensor, Float[torch.Tensor, "batch pos n"]]:
    """:func:`_plain`'s answer for ``b``, after recording whether :func:`_shared` agrees with it (warns if not).

    A KV-cache path can break with a library release (transformers 5.24 did, through the bridge); the texts
    are then read with the plain pass, which costs the prefix's share of the time again.
    """
    tokens, mask, plain = _plain(model, b, neurons)
    _, mask2, two = _shared(model, b, split, neurons)
    scale = max(1.0, float(plain.abs().max()))
    ok = bool(torch.equal(mask.sum(-1), mask2.sum(-1)))
    ok = ok and all(torch.allclose(plain[r][mask[r]], two[r][mask2[r]], rtol=0, atol=1e-3 * scale) for r in range(len(b)))
    _SPLIT_CHECKED[model] = ok
    if not ok:
        log.warning("neuron activations: running the shared prompt prefix once disagrees with the plain pass (the "
                    "model's KV-cache path); reading every text in full")
    return tokens, mask, plain
