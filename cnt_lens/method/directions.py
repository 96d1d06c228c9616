"""Direction edits: the refusal edits practitioners use, as baselines beside neuron transfer.

Arditi et al. (2024) find one residual-stream direction per layer, the difference of the mean residual at a
prompt's last token over harmful and over harmless prompts, and remove refusal by orthogonalising every
weight that writes to the residual stream against it ("abliteration"; heretic searches per-layer weights of the
same edit). :func:`mean_difference` computes the direction; :func:`ablated` is the edit, temporary like
:meth:`~cnt_lens.method.transplant.NeuronPatch.applied`: each attention output and MLP down projection ``W``
becomes ``W − α r rᵀ W`` (``α = 1``: nothing is written along ``r`` any more), and every edited tensor is
restored exactly on exit. The embedding is left alone: in models that tie it to the unembedding, editing it
would also change what the output reads.

Activation addition (steering) is the other direction edit: :func:`added` writes a vector into the residual
stream at every position, in weight space, as a bias on the MLP output projection of the block before
(e.g. the refusal direction of a model that refuses, scaled by its mean difference, into one that does not).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from cnt_lens.data.tokens import chat_format, chunks, encode
from cnt_lens.models.forward import Model, device_of, model_tokenizer, takes_logits_to_keep
from cnt_lens.models.hf import hf_state_dict, plain_hf_model

__all__ = ["WRITERS", "ablated", "added", "mean_difference", "residual_writers"]

#: the weights (HF names, by their ending) that write to the residual stream inside each block
WRITERS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def _last_residuals(model: Model, plain: torch.nn.Module, prompts: Sequence[str], layer: int,
                    batch_size: int) -> Float[Tensor, "n d_model"]:
    """The residual entering block ``layer`` (``hook_resid_pre``) at each chat-formatted prompt's last token.

    ``plain`` is ``model``'s :func:`~cnt_lens.models.hf.plain_hf_model`; one position is unembedded, none is read.
    """
    tok = model_tokenizer(model)
    last = {"logits_to_keep": 1} if takes_logits_to_keep(plain) else {}
    out = []
    for chunk in chunks([chat_format(tok, p) for p in prompts], batch_size):
        b = encode(tok, list(chunk)).to(device_of(model))
        with torch.no_grad():
            states = plain(input_ids=b.tokens, attention_mask=b.attention_mask, position_ids=b.position_ids,
                           output_hidden_states=True, **last).hidden_states
        out.append(states[layer][:, -1].float().cpu())  # left-padded: the last column is each prompt's own
    return torch.cat(out)


def mean_difference(model: Model, first: Sequence[str], second: Sequence[str], layer: int, *,
                    batch_size: int = 32, unit: bool = True) -> Float[Tensor, " d_model"]:
    """The direction from the mean residual of ``second`` to that of ``first`` (prompts, chat-formatted here).

    Read at block ``layer``'s input (``hook_resid_pre``; ``layer = n_layers`` is the final residual) at each
    prompt's last token, where the answer's first token is decided. ``unit``: normalised (for
    :func:`ablated`); otherwise the difference of means itself, in the residual's units (for :func:`added`).
    Raises :class:`ValueError` on an empty prompt list or a layer outside ``[0, n_layers]``.
    """
    n_layers = model.cfg.n_layers
    if not first or not second:
        raise ValueError(f"mean_difference needs prompts on both sides (got {len(first)} and {len(second)})")
    if not 0 <= layer <= n_layers:
        raise ValueError(f"layer {layer} outside [0, {n_layers}] (the residual entering a block, or the final one)")
    plain = plain_hf_model(model)
    diff = (_last_residuals(model, plain, first, layer, batch_size).mean(0)
            - _last_residuals(model, plain, second, layer, batch_size).mean(0))
    return diff / diff.norm().clamp(min=1e-12) if unit else diff


def residual_writers(model: Model) -> dict[str, Tensor]:
    """``model``'s weights that write to the residual stream (:data:`WRITERS`), by HF name: the live tensors.

    Raises :class:`ValueError` for a family whose blocks name them otherwise (e.g. GPT-2's ``c_proj``).
    """
    found = {k: v for k, v in hf_state_dict(model).items() if k.endswith(WRITERS)}
    if len(found) != len(WRITERS) * model.cfg.n_layers:
        raise ValueError(f"directional ablation reads the weights named *{' and *'.join(WRITERS)} (Llama, Qwen, "
                         f"Mistral, Gemma); {type(model.original_model).__name__} has {len(found)} of the "
                         f"{len(WRITERS) * model.cfg.n_layers} expected")
    return found


@contextlib.contextmanager
def ablated(model: Model, direction: Float[Tensor, " d_model"], alpha: float = 1.0,
            layers: Sequence[int] | None = None) -> Iterator[Any]:
    """Temporary directional ablation: inside the block, each writer ``W`` of ``layers`` (default all) is ``W − α r rᵀ W``.

    ``direction`` is normalised here. Every edited tensor is saved first and written back on exit (errors and
    interrupts too), bit for bit; edits made inside the block to the same tensors (a neuron patch) are
    undone with it, so nest other edits inside, never across.
    """
    r = direction.detach().float()
    r = r / r.norm().clamp(min=1e-12)
    keep = None if layers is None else {f"layers.{i}." for i in layers}
    writers = {k: w for k, w in residual_writers(model).items() if keep is None or any(s in k for s in keep)}
    saved = {k: w.detach().clone() for k, w in writers.items()}
    try:
        with torch.no_grad():
            for w in writers.values():
                rr = r.to(w.device)
                w.sub_((alpha * torch.outer(rr, rr @ w.float())).to(w.dtype))
        yield model
    finally:
        with torch.no_grad():
            for k, w in writers.items():
                w.copy_(saved[k])


@contextlib.contextmanager
def added(model: Model, vector: Float[Tensor, " d_model"], layer: int) -> Iterator[Any]:
    """Temporary activation addition: inside the block, ``vector`` is added to the residual entering block ``layer``.

    In weight space: the bias of block ``layer − 1``'s MLP output projection (``mlp.down_proj``) becomes
    ``vector`` (plus any bias it had), so every position of every forward pass, generation included, reads
    it. ``layer`` is in ``[1, n_layers]`` (the input of block 0 is the embedding). The projection's bias
    is restored on exit (errors and interrupts too): removed when it had none, its old values otherwise.
    """
    n_layers = model.cfg.n_layers
    if not 1 <= layer <= n_layers:
        raise ValueError(f"layer {layer} outside [1, {n_layers}]: the vector is written by block layer − 1's MLP")
    residual_writers(model)  # the family's names are checked there
    name = f"layers.{layer - 1}.{WRITERS[1].removesuffix('.weight')}"
    proj = next(m for k, m in model.original_model.named_modules()
                if isinstance(m, torch.nn.Linear) and k.replace("._original_component", "").endswith(name))
    if tuple(vector.shape) != (proj.out_features,):
        raise ValueError(f"vector has shape {tuple(vector.shape)}; the residual stream is ({proj.out_features},)")
    old = proj.bias
    add = vector.detach().to(proj.weight.device, proj.weight.dtype)
    try:
        with torch.no_grad():
            proj.bias = torch.nn.Parameter(add if old is None else old.detach() + add, requires_grad=False)
        yield model
    finally:
        proj.bias = old
