"""The fine-tuning the recipes share: AdamW over shuffled batches, and the two objectives it runs.

:func:`lm_loss` is supervised next-token loss on each example's answer; :func:`preference_loss` a pairwise
preference between two sentences. A recipe's cache key holds every :class:`TuneConfig` field, so a tune is
rebuilt whenever one changes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import torch

from cnt_lens.behaviours.base import pair_logprob_gap
from cnt_lens.behaviours.bias import pair_batches
from cnt_lens.core.progress import progress_bar
from cnt_lens.data.tokens import encode
from cnt_lens.models.forward import Model, device_of, model_tokenizer

__all__ = ["IGNORE", "Loss", "TuneConfig", "finetune", "lm_loss", "preference_loss"]

IGNORE = -100
"""The label HF's loss skips."""

Loss = Callable[[Any, list[int]], torch.Tensor]
"""``loss(model, example_indices) -> scalar``: one training objective over a batch of examples."""


@dataclass(frozen=True)
class TuneConfig:
    """Settings of a fine-tune recipe; every field enters the recipe's cache key."""

    steps: int = 48
    batch_size: int = 8
    lr: float = 3e-5
    seed: int = 0
    train: str = "all"  # "all" parameters, or "mlp" weights only
    max_new_tokens: int = 40  # length of the self-distilled harmless answers


def finetune(model: Model, n_examples: int, loss_fn: Loss, cfg: TuneConfig, desc: str) -> None:
    """AdamW on ``loss_fn`` over shuffled batches of the ``n_examples`` examples, in place (seeded by ``cfg.seed``)."""
    hf = model.original_model
    params = [p for n, p in hf.named_parameters() if cfg.train == "all" or ".mlp." in n]
    if not params:
        raise ValueError(f"train={cfg.train!r} selects no parameters")
    if n_examples == 0:
        raise ValueError("no training examples")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    order: list[int] = []
    hf.train()
    try:
        for _ in progress_bar(range(cfg.steps), desc=desc):
            if len(order) < cfg.batch_size:
                order += rng.sample(range(n_examples), n_examples)
            idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
            loss_fn(model, idx).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        hf.eval()
        for p in hf.parameters():
            p.requires_grad_(False)


def lm_loss(examples: list[tuple[str, str]]) -> Loss:
    """Supervised LM loss on (prefix, target) text pairs, on the target's tokens only (HF's ``labels`` loss).

    Prefixes are fully formatted (a chat prompt with its assistant header, or a bare BOS); a pair is
    tokenized as one text, and its answer is what follows the prefix's own tokens. Every position is
    unembedded: a loss that reads fewer positions, or runs a shared prefix once, is the same loss only up to
    float rounding, and a donor's last bits move a run's answer (RESULTS.md, "Where does a run's time go").
    """

    def loss(model: Model, idx: list[int]) -> torch.Tensor:
        tok = model_tokenizer(model)
        prompts = [examples[i][0] for i in idx]
        b = encode(tok, [p + examples[i][1] for p, i in zip(prompts, idx)]).to(device_of(model))
        labels = b.tokens.clone()
        labels[b.attention_mask == 0] = IGNORE
        for row, p in enumerate(prompts):
            start = int((b.attention_mask[row] == 0).sum())
            labels[row, : start + len(tok(p, add_special_tokens=False)["input_ids"])] = IGNORE
        return model.original_model(input_ids=b.tokens, attention_mask=b.attention_mask,
                                    position_ids=b.position_ids, labels=labels).loss

    return loss


def preference_loss(better: list[str], worse: list[str]) -> Loss:
    """Pairwise preference: ``softplus(-(log p(better) - log p(worse)))`` per pair (sentence log-probs).

    It trains the *difference* between two minimally different sentences — the tokens that carry
    the preference — rather than every token of one side, and it saturates once a pair is clearly
    preferred. (On SmolLM2 with the bundled pairs it still memorises them: see
    :func:`~cnt_lens.experiments.recipes.bias_tune`.)
    """

    def loss(model: Model, idx: list[int]) -> torch.Tensor:
        b = pair_batches(model_tokenizer(model), [better[i] for i in idx], [worse[i] for i in idx], len(idx))[0]
        b = b.to(device_of(model))
        logits = model.original_model(input_ids=b.tokens, attention_mask=b.attention_mask,
                                      position_ids=b.position_ids).logits
        return torch.nn.functional.softplus(-pair_logprob_gap(logits, b)).mean()

    return loss
