"""First-token KL divergence from the unedited model: what the field reads as an edit's cost on harmless prompts.

Refusal edits are compared by refusals per 100 harmful prompts and by the KL divergence, at the first
generated token, of the edited model from the unedited one on harmless prompts (heretic; Arditi et
al.). :func:`next_token_logprobs` reads a model's distribution at the last position of each input
once; :func:`first_token_kl` compares an edited model with it, prompt by prompt, and reports the mean
with a bootstrap interval (:func:`~cnt_lens.core.stats.mean`). The inputs are the behaviour's own
(:meth:`~cnt_lens.behaviours.base.Behaviour.kl_batches`: the harmless prompts, chat-formatted, for
refusal). An evaluation that generates from those same prompts computes their next-token distribution
in its prompt pass: inside :func:`watching`, :meth:`KLReference.of` reads it from there and runs
only the inputs no generation saw.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from cnt_lens.behaviours.generation import first_token_logprobs
from cnt_lens.core.stats import mean
from cnt_lens.data.tokens import Batch
from cnt_lens.models.forward import Model, device_of, logits_of

__all__ = ["KL_NAME", "KLReference", "Seen", "first_token_kl", "kl_divergence", "next_token_logprobs", "watching"]

#: the block key of the mean first-token KL (with its ``_n`` and ``_ci95``)
KL_NAME = "kl_first_token"


#: next-token log-probabilities ``[vocab]`` already computed, by input (:meth:`~cnt_lens.data.Batch.row_ids`)
Seen = Mapping[tuple[int, ...], Tensor | None]


def next_token_logprobs(model: Model, batches: list[Batch], seen: Seen | None = None) -> Float[Tensor, "n vocab"]:
    """``model``'s log-probabilities of the next token after each input of ``batches`` (fp32, on the CPU).

    Inputs are left-padded, so the last position is each row's own last token. A batch whose every
    input is in ``seen`` (e.g. from a generation's prompt pass, :func:`watching`) is read from there,
    not run.
    """
    out = []
    with torch.no_grad():
        for b in batches:
            known = [seen.get(ids) for ids in b.row_ids()] if seen else [None]
            if all(x is not None for x in known):
                out.append(torch.stack(known))  # type: ignore[arg-type]
                continue
            b = b.to(device_of(model))
            logits = logits_of(model, b.tokens, b.model_kwargs(), keep=1)[:, -1]
            out.append(torch.log_softmax(logits.float(), dim=-1).cpu())
    return torch.cat(out)


def kl_divergence(reference: Float[Tensor, "n vocab"], edited: Float[Tensor, "n vocab"]) -> Float[Tensor, " n"]:
    """KL(reference ‖ edited) per row, in nats, from two rows of log-probabilities.

    Example:
        >>> p = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0]]), -1)
        >>> float(kl_divergence(p, p))
        0.0
    """
    return (reference.exp() * (reference - edited)).sum(-1).clamp(min=0.0)


def first_token_kl(model: Model, reference: Float[Tensor, "n vocab"], batches: list[Batch],
                   seen: Seen | None = None) -> dict[str, Any]:
    """``{kl_first_token, _n, _ci95}``: the mean over inputs of KL(unedited ‖ ``model``) at the next token.

    ``reference`` is :func:`next_token_logprobs` of the unedited model on the same ``batches``;
    ``seen``: ``model``'s log-probabilities already read (:func:`next_token_logprobs`).
    """
    return mean(KL_NAME, kl_divergence(reference, next_token_logprobs(model, batches, seen)).tolist())


class KLReference(NamedTuple):
    """The inputs of a first-token KL and the unedited model's log-probabilities on them, read once.

    ``of(model)`` is the block ``{kl_first_token, _n, _ci95}`` of ``model`` (the edited one) against them.

    Example:
        >>> from cnt_lens.workflow.testing import tiny_model
        >>> from cnt_lens.data.tokens import Batch
        >>> model = tiny_model()
        >>> tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
        >>> batches = [Batch(tokens, torch.ones_like(tokens), torch.arange(3).expand(2, 3))]
        >>> ref = KLReference.of_model(model, batches)
        >>> ref.of(model)["kl_first_token"], ref.unedited() == ref.of(model)
        (0.0, True)
    """

    batches: list[Batch]
    logprobs: Float[Tensor, "n vocab"]

    @classmethod
    def of_model(cls, model: Model, batches: list[Batch], seen: Seen | None = None) -> "KLReference":
        """``model``'s next-token log-probabilities on ``batches`` (run it on the unedited model).

        ``seen``: as :func:`next_token_logprobs`.
        """
        return cls(batches, next_token_logprobs(model, batches, seen))

    def of(self, model: Model, seen: Seen | None = None) -> dict[str, Any]:
        """:func:`first_token_kl` of ``model`` from the unedited model on the same inputs.

        ``seen``: the inputs already read, e.g. by :func:`watching` an evaluation of ``model``.
        """
        return first_token_kl(model, self.logprobs, self.batches, seen)

    def unedited(self) -> dict[str, Any]:
        """The unedited model's own block (KL 0 on every input), without running it again."""
        return mean(KL_NAME, kl_divergence(self.logprobs, self.logprobs).tolist())


@contextlib.contextmanager
def watching(batches: list[Batch] | KLReference | None) -> Iterator[Seen]:
    """A block in which every generation from an input of ``batches`` (or a reference's) keeps its first-token log-probs.

    Yields them by input (:data:`Seen`; empty for ``None``).

    Example: an evaluation's generations give the KL its inputs' distributions, one pass saved::

        with watching(reference) as seen:
            block = measure(model, [refusal], "validation")
        block |= reference.of(model, seen)
    """
    if isinstance(batches, KLReference):
        batches = batches.batches
    with first_token_logprobs([ids for b in batches or [] for ids in b.row_ids()]) as seen:
        yield seen
