"""Behaviours: what a model does on a prompt set, as a differentiable metric and a discrete evaluation.

Every behaviour offers

* ``batches(tokenizer, split, batch_size)`` — model inputs for its prompts;
* ``metric(logits, batch) -> [n_items]`` — differentiable, **higher = more of the behaviour**
  (attribution differentiates it; patching measures its change);
* ``control_batches(...)`` — contrasting inputs (harmless prompts for refusal, …), used by the
  activation-contrast baseline;
* ``evaluate(model, split)`` — the discrete numbers papers report, with ``headline`` naming the
  one that goals are stated in (e.g. ``refusal_harmful``);
* ``evaluate_items(model, split)`` — the same per prompt, with its category, for breakdowns.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from cnt_lens.data.prompt_set import PromptSet
from cnt_lens.data.tokens import Batch
from cnt_lens.models.forward import Model, device_of, logits_of, model_tokenizer

__all__ = ["Behaviour", "sequence_logprobs"]


def sequence_logprobs(logits: Float[Tensor, "batch pos vocab"], batch: Batch) -> Float[Tensor, "batch pos_minus_1"]:
    """Log-probability of each real next token (0 where the target or its context is padding)."""
    logp = logits[:, :-1].float().log_softmax(-1)
    target = batch.tokens[:, 1:]
    lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    valid = (batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]).to(lp.dtype)
    return lp * valid


def pair_logprob_gap(logits: Float[Tensor, "batch pos vocab"], batch: Batch) -> Float[Tensor, " pairs"]:
    """``log p(first) - log p(second)`` per pair of a :func:`pair_batches` batch (sentence log-probs)."""
    lp = sequence_logprobs(logits, batch).sum(-1)
    n = batch.meta["n_pairs"]
    return lp[:n] - lp[n:]


def first_tokens(tokenizer: Any, phrases: tuple[str, ...]) -> list[int]:
    ids = []
    for p in phrases:
        for variant in (p, " " + p):
            toks = tokenizer(variant, add_special_tokens=False)["input_ids"]
            if toks:
                ids.append(toks[0])
    return sorted(set(ids))


def item_record(record: dict[str, Any], kind: str) -> dict[str, Any]:
    """The fields every refusal item carries from its prompt record."""
    return {"id": record["id"], "set": kind, "category": record["category"], "family": record.get("family"),
            "role": record.get("role"), "prompt": record["prompt"]}


class Behaviour(abc.ABC):
    """Interface every behaviour implements (see the module docstring)."""

    name: str = "behaviour"
    headline: str = ""
    #: +1 / −1: transplants should raise / lower :meth:`metric`. ``None`` (default): the sign of the
    #: donor's mean metric minus the target's on the scored prompts. Set it when the metric cannot be
    #: read fairly on the donor (a teacher-forced prefix the donor never writes).
    toward: float | None = None
    #: A continuous number from :meth:`evaluate` that breaks ties between candidate patches closing
    #: the same share of the headline's gap (a rate over a few dozen items moves in steps), e.g.
    #: ``"logprob_gap"`` for :class:`StereotypeBias`. ``None``: no tie-break.
    tiebreak: str | None = None

    def __repr__(self) -> str:
        """One line: the class, its prompt sets by size and its settings that differ from their defaults."""
        parts = []
        for f in dataclasses.fields(self) if dataclasses.is_dataclass(self) else ():
            value = getattr(self, f.name)
            if isinstance(value, PromptSet):
                parts.append(f"{f.name}={len(value)}")
            elif f.default is not dataclasses.MISSING and value != f.default:
                text = repr(value)
                parts.append(f"{f.name}={text if len(text) <= 40 else text[:37] + '...'}")
        return f"{type(self).__name__}({', '.join(parts)})"

    @abc.abstractmethod
    def batches(self, tokenizer: Any, split: str | None, batch_size: int) -> list[Batch]:
        """Tokenized prompts of ``split`` whose :meth:`metric` the scorers read, ``batch_size`` per batch."""

    @abc.abstractmethod
    def metric(self, logits: Float[Tensor, "batch pos vocab"], batch: Batch) -> Float[Tensor, " items"]:
        """Differentiable behaviour number per item (higher = more of the behaviour).

        ``logits`` hold at least the last :meth:`logits_to_keep` positions of ``batch`` (all of them
        when it is 0); index them from the end.
        """

    def logits_to_keep(self, batch: Batch) -> int:
        """How many of ``batch``'s last positions :meth:`metric` reads logits at (0: every position).

        Forward passes that feed :meth:`metric` unembed only those (:func:`~cnt_lens.models.logits_of`).
        Default 0; a subclass that reads a few answer positions returns their exact count.
        """
        return 0

    def control_batches(self, tokenizer: Any, split: str | None, batch_size: int) -> list[Batch]:
        """Control prompts (e.g. harmless requests) for contrast scores; behaviours without any raise."""
        raise NotImplementedError(f"{self.name} has no control prompts")

    def kl_batches(self, tokenizer: Any, split: str | None, batch_size: int) -> list[Batch]:
        """Inputs an edit should leave alone, ending where the answer starts; ``[]`` (the default): none.

        The first-token KL of an edited model from the unedited one is read at their last position
        (:mod:`cnt_lens.method.divergence`); a behaviour without such inputs reports no KL.
        """
        return []

    @abc.abstractmethod
    def evaluate_items(self, model: Model, split: str | None, *, batch_size: int = 16,
                       progress: bool = True) -> list[dict[str, Any]]:
        """Discrete evaluation, one dict per prompt (what ``items.jsonl`` of a run holds)."""

    def estimate_items(self, model: Model, split: str | None, *, batch_size: int = 16,
                       progress: bool = True) -> list[dict[str, Any]]:
        """:meth:`evaluate_items` estimated more cheaply (one forward pass, or a short greedy opening).

        Same records and keys, so :meth:`aggregate` and every constraint read them unchanged;
        searches decide their points with it and confirm the few that matter with
        :meth:`evaluate_items`. Behaviours whose evaluation already is one forward pass per prompt
        (:class:`Utility`, :class:`StereotypeBias`) keep this default, which *is* the evaluation.
        """
        return self.evaluate_items(model, split, batch_size=batch_size, progress=progress)

    def decided_items(self, model: Model, split: str | None, *, batch_size: int = 16,
                      progress: bool = True) -> list[dict[str, Any]]:
        """:meth:`evaluate_items`' verdicts, each response generated only until its verdict is decided.

        Same records, same verdicts and numbers; only the texts may end early (for refusal, where
        :func:`~cnt_lens.behaviours.judge.verdict_is_final` holds; for a format task, once the answer starts
        with its prefix or departs from it). :func:`~cnt_lens.method.evaluate.measure` uses it
        when nobody keeps the records. Default: :meth:`evaluate_items` itself.
        """
        return self.evaluate_items(model, split, batch_size=batch_size, progress=progress)

    @property
    def estimate_is_evaluation(self) -> bool:
        """Whether :meth:`estimate_items` is the evaluation itself (nothing for a screened search to save)."""
        return type(self).estimate_items is Behaviour.estimate_items

    @property
    def decided_is_evaluation(self) -> bool:
        """Whether :meth:`decided_items` is the evaluation itself (its records' texts are whole ones)."""
        return type(self).decided_items is Behaviour.decided_items

    def metric_items(self, model: Model, batches: list[Batch]) -> list[float]:
        """:meth:`metric` of every item of ``batches`` on ``model``, one forward pass per batch (no gradients)."""
        out: list[float] = []
        for b in batches:
            b = b.to(device_of(model))
            with torch.no_grad():
                logits = logits_of(model, b.tokens, b.model_kwargs(), keep=self.logits_to_keep(b))
                out += self.metric(logits, b).float().tolist()
        return out

    @abc.abstractmethod
    def aggregate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """The evaluation numbers of :meth:`evaluate_items`' items: rates with ``_n`` and ``_ci95``."""

    def evaluate(self, model: Model, split: str | None, *, batch_size: int = 16,
                 progress: bool = True) -> dict[str, Any]:
        """The behaviour's discrete evaluation numbers on one split."""
        return self.aggregate(self.evaluate_items(model, split, batch_size=batch_size, progress=progress))

    def mean_metric(self, model: Model, split: str | None = "train", *, batch_size: int = 16) -> float:
        """Mean of :meth:`metric` over a split (no gradients)."""
        values = self.metric_items(model, self.batches(model_tokenizer(model), split, batch_size))
        return sum(values) / max(len(values), 1)
