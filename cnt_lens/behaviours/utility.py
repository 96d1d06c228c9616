"""Utility side effects: loss on reference text, multiple-choice accuracy, a formatting task.

Each is a :class:`~cnt_lens.behaviours.base.Behaviour` whose metric moves when a transplant costs the
target its general ability; a run preserves them and reports them beside the headline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from jaxtyping import Float
from torch import Tensor
from typing_extensions import override

from cnt_lens.behaviours.base import Behaviour, first_tokens, sequence_logprobs
from cnt_lens.behaviours.generation import generate
from cnt_lens.core.stats import rate
from cnt_lens.data.prompt_set import PromptSet, load_prompts
from cnt_lens.data.tokens import Batch, chat_format, chunks, encode
from cnt_lens.models.forward import Model, device_of, logits_of, model_tokenizer

__all__ = ["FormatTask", "Utility"]


def _mc_text(record: dict[str, Any]) -> str:
    letters = "ABCD"
    options = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(record["choices"]))
    return f"{record['question']}\n{options}\nAnswer with the letter of the correct option."


@dataclass(repr=False)
class Utility(Behaviour):
    """General ability that a transplant must not damage.

    Metric: minus the mean token NLL of each reference text (higher = better). Evaluation:
    ``utility_nll`` (mean NLL per token over the split's reference texts, nats) and ``mc_accuracy``
    (share of multiple-choice questions whose correct letter gets the highest first-answer-token logit).
    """

    reference: PromptSet = field(default_factory=lambda: load_prompts("reference"))
    mc: PromptSet = field(default_factory=lambda: load_prompts("mc"))
    name: str = "utility"
    headline: str = "utility_nll"

    @override
    def batches(self, tokenizer: Any, split: str | None, batch_size: int) -> list[Batch]:
        texts = self.reference.split(split).column("text")
        return [encode(tokenizer, list(c), add_bos=True) for c in chunks(texts, batch_size)]

    @override
    def metric(self, logits: Float[Tensor, "batch pos vocab"], batch: Batch) -> Float[Tensor, " batch"]:
        lp = sequence_logprobs(logits, batch)
        n = (batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]).sum(-1).clamp(min=1)
        return lp.sum(-1) / n

    @override
    def evaluate_items(self, model: Model, split: str | None, *, batch_size: int = 16,
                       progress: bool = True) -> list[dict[str, Any]]:
        tok = model_tokenizer(model)
        dev = device_of(model)
        items: list[dict[str, Any]] = []
        refs = self.reference.split(split).records
        for i, b in enumerate(self.batches(tok, split, batch_size)):
            b = b.to(dev)
            with torch.no_grad():
                lp = sequence_logprobs(model(b.tokens, **b.model_kwargs()), b)
            n = (b.attention_mask[:, 1:] * b.attention_mask[:, :-1]).sum(-1)
            for r, s, k in zip(refs[i * batch_size:], lp.sum(-1).tolist(), n.tolist()):
                items.append({"id": r["id"], "category": r["category"], "kind": "nll", "nll_sum": -s, "n_tokens": k})
        letter_ids = [first_tokens(tok, (c,)) for c in "ABCD"]
        mcs = self.mc.split(split).records
        for chunk in chunks(list(mcs), batch_size):
            b = encode(tok, [chat_format(tok, _mc_text(r)) for r in chunk]).to(dev)
            with torch.no_grad():
                last = logits_of(model, b.tokens, b.model_kwargs(), keep=1)[:, -1]
            scores = torch.stack([last[:, ids].max(-1).values for ids in letter_ids], -1)
            for r, pred in zip(chunk, scores.argmax(-1).tolist()):
                items.append({"id": r["id"], "category": r["category"], "kind": "mc", "correct": pred == r["answer"]})
        return items

    @override
    def aggregate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        nll = [i for i in items if i["kind"] == "nll"]
        mc = [i["correct"] for i in items if i["kind"] == "mc"]
        return {"utility_nll": sum(i["nll_sum"] for i in nll) / max(sum(i["n_tokens"] for i in nll), 1),
                "utility_nll_tokens": sum(i["n_tokens"] for i in nll), **rate("mc_accuracy", mc)}


@dataclass(repr=False)
class FormatTask(Behaviour):
    """A benign, learnable task: starting every answer with ``prefix`` (the task of the NLSR attack).

    Metric: log-probability of the prefix's first token at the first answer position. Evaluation:
    ``task_rate``, the share of greedy answers to harmless prompts that start with the prefix.
    """

    prompts: PromptSet = field(default_factory=lambda: load_prompts("harmless"))
    prefix: str = "Answer:"
    max_new_tokens: int = 6
    name: str = "format_task"
    headline: str = "task_rate"

    @override
    def batches(self, tokenizer: Any, split: str | None, batch_size: int) -> list[Batch]:
        first = tokenizer(self.prefix, add_special_tokens=False)["input_ids"][0]
        texts = [chat_format(tokenizer, p) for p in self.prompts.split(split).column("prompt")]
        return [encode(tokenizer, list(c), meta={"prefix_id": first}) for c in chunks(texts, batch_size)]

    @override
    def logits_to_keep(self, batch: Batch) -> int:
        return 1

    @override
    def metric(self, logits: Float[Tensor, "batch pos vocab"], batch: Batch) -> Float[Tensor, " batch"]:
        return logits[:, -1].float().log_softmax(-1)[:, batch.meta["prefix_id"]]

    @override
    def evaluate_items(self, model: Model, split: str | None, *, batch_size: int = 16,
                       progress: bool = True) -> list[dict[str, Any]]:
        return self._answered(model, split, batch_size, progress)

    @override
    def decided_items(self, model: Model, split: str | None, *, batch_size: int = 16,
                      progress: bool = True) -> list[dict[str, Any]]:
        """:meth:`evaluate_items`, each answer generated only until it starts with the prefix or departs from it."""
        return self._answered(model, split, batch_size, progress, until=self.decided)

    def decided(self, text: str) -> bool:
        """Whether no continuation of the answer ``text`` can change whether it starts with :attr:`prefix`.

        Example:
            >>> task = FormatTask(prefix="Answer:")
            >>> task.decided(" Ans"), task.decided("Answer: 4"), task.decided("Sure")
            (False, True, True)
        """
        start = text.lstrip()
        return start.startswith(self.prefix) or (bool(start) and not self.prefix.startswith(start))

    def _answered(self, model: Model, split: str | None, batch_size: int, progress: bool,
                  until: Callable[[str], bool] | None = None) -> list[dict[str, Any]]:
        """Greedy answers (at most :attr:`max_new_tokens`; ``until``: :func:`generate`'s) and whether each follows the prefix."""
        tok = model_tokenizer(model)
        recs = self.prompts.split(split).records
        out = generate(model, [chat_format(tok, r["prompt"]) for r in recs], max_new_tokens=self.max_new_tokens,
                       batch_size=batch_size, progress=progress, until=until)
        return [{"id": r["id"], "category": r["category"], "response": o, "followed": o.strip().startswith(self.prefix)}
                for r, o in zip(recs, out)]

    @override
    def estimate_items(self, model: Model, split: str | None, *, batch_size: int = 16,
                       progress: bool = True) -> list[dict[str, Any]]:
        """Followed = the prefix's first token is more likely than not at the first answer position."""
        recs = self.prompts.split(split).records
        logp = self.metric_items(model, self.batches(model_tokenizer(model), split, batch_size))
        return [{"id": r["id"], "category": r["category"], "log_p": lp, "followed": lp > -0.6931471805599453}
                for r, lp in zip(recs, logp)]

    @override
    def aggregate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return rate("task_rate", [i["followed"] for i in items])
