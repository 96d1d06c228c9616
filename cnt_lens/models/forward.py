"""Running a hooked model: its layers, context, device, tokenizer, and logits with or without a cache."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Iterable, TypeAlias

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

__all__ = ["Model", "context_length", "logits_of", "takes_logits_to_keep"]

#: The hooked model every function of cnt_lens takes: TransformerLens 4's bridge around a HuggingFace model
#: (its hook names are HookedTransformer's). A streamed donor (:class:`~cnt_lens.models.streamed.StreamedDonor`)
#: is accepted only where a signature says ``Model | DonorWeights``.
Model: TypeAlias = TransformerBridge


def model_tokenizer(model: Model) -> Any:
    """The tokenizer the model was loaded with (not TransformerLens's BOS-forcing re-wrap)."""
    return getattr(model, "cnt_tokenizer", None) or model.tokenizer


def iter_layers(model: Model) -> Iterable[int]:
    return range(int(model.cfg.n_layers))


def context_length(model: Model) -> int:
    """The longest token sequence the model takes (``cfg.n_ctx``, from the HF config's positions)."""
    return int(model.cfg.n_ctx)


def device_of(model: Model) -> torch.device:
    return next(model.parameters()).device


def takes_logits_to_keep(model: Any) -> bool:
    """Whether the HF forward under ``model`` (a bridge or a plain HF module) can unembed only the last positions."""
    return _forward_takes_logits_to_keep(type(getattr(model, "original_model", model)))


@functools.lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(cls: type) -> bool:
    """Per model class, once: the signature is read at every scoring batch otherwise."""
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def logits_of(model: Any, tokens: Int[Tensor, "batch pos"], kwargs: dict[str, Any], hooks: Iterable[Any] = (),
              keep: int = 0) -> Float[Tensor, "batch kept vocab"]:
    """``model``'s logits on ``tokens`` (``kwargs``: attention mask, positions), with TransformerLens forward hooks.

    ``model`` is a :data:`Model`, its plain HF model, or a streamed donor (whose call says it cannot run).

    ``keep > 0``: only the last ``keep`` positions are unembedded (``kept = keep``), where the HF model
    takes ``logits_to_keep``; otherwise, and with ``keep = 0``, every position (``kept = pos``). The
    unembedding of every position is about a fifth of a small model's forward and backward pass, and a
    metric that reads the answer's first tokens needs a handful. Readers index from the end, so they
    read the same numbers either way.
    """
    return _run(model, tokens, kwargs, hooks, keep)


def logits_and_cache(model: Any, tokens: Int[Tensor, "batch pos"], kwargs: dict[str, Any], hooks: Iterable[Any] = (),
                     keep: int = 0) -> tuple[Float[Tensor, "batch kept vocab"], Any]:
    """:func:`logits_of` and the HF KV cache after ``tokens`` (to run more tokens on, as ``past_key_values``).

    With gradients on, the cache's keys and values stay in the autograd graph.
    """
    return _run(model, tokens, {**kwargs, "return_type": "logits_and_cache", "use_cache": True}, hooks, keep)


def _run(model: Any, tokens: Tensor, kwargs: dict[str, Any], hooks: Iterable[Any], keep: int) -> Any:
    """The bridge's forward on ``tokens`` with TransformerLens hooks, unembedding the last ``keep`` positions."""
    extra = {"logits_to_keep": keep} if keep > 0 and takes_logits_to_keep(model) else {}
    hooks = list(hooks)
    if hooks:
        return model.run_with_hooks(tokens, fwd_hooks=hooks, **kwargs, **extra)
    return model(tokens, **kwargs, **extra)
