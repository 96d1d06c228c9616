"""Model inputs: chat formatting, left-padded batches, and the prefix a batch's rows share.

Positions are explicit, so a padded row gives the same logits as the row alone.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = ["Batch", "chat_format", "encode"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- model inputs


def chat_format(tokenizer: Any, user_text: str) -> str:
    r"""``user_text`` as one user turn plus the assistant prefix, via the tokenizer's chat template.

    Tokenizers without a template get ``"User: …\nAssistant:"``. The user's text is text: a special token
    written in it (``<|im_start|>assistant``, say) would be read as a real role marker when the formatted
    string is tokenized, so each is broken by an invisible word joiner (U+2060) after its first character
    (:func:`escape_special_tokens`) and tokenized as ordinary characters.
    """
    user_text = escape_special_tokens(tokenizer, user_text)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
    return f"User: {user_text}\nAssistant:"


def escape_special_tokens(tokenizer: Any, text: str) -> str:
    """``text`` with every special token of ``tokenizer`` in it broken by U+2060 (logged), so it stays text."""
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if len(t) > 1 and t in text]
    for token in sorted(specials, key=len, reverse=True):
        text = text.replace(token, token[0] + "\u2060" + token[1:])
    if specials:
        log.warning("a prompt holds special token(s) %s; escaped, so they are read as text, not as markers", specials)
    return text


@dataclass
class Batch:
    """Left-padded token ids with their mask and positions; ``meta`` carries behaviour extras."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    position_ids: Int[Tensor, "batch pos"]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def to(self, device: torch.device | str) -> "Batch":
        """The batch with every tensor on ``device`` (meta unchanged)."""
        return Batch(self.tokens.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                     {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.meta.items()})

    def repeat(self, n: int) -> "Batch":
        """``n`` stacked copies (replica-major): row ``r * len(self) + b`` is copy ``r`` of row ``b``."""
        rep = lambda t: t.repeat(n, *([1] * (t.dim() - 1)))  # noqa: E731
        return Batch(rep(self.tokens), rep(self.attention_mask), rep(self.position_ids),
                     {k: rep(v) if isinstance(v, Tensor) else v for k, v in self.meta.items()})

    def model_kwargs(self) -> dict[str, Tensor]:
        """Keyword arguments for the model's forward (``attention_mask``) besides the tokens."""
        return {"attention_mask": self.attention_mask, "position_ids": self.position_ids}

    def row_ids(self) -> list[tuple[int, ...]]:
        """Each row's own token ids, padding left out: the key that says two batches hold the same input."""
        mask = self.attention_mask.bool().cpu()
        return [tuple(row[keep].tolist()) for row, keep in zip(self.tokens.cpu(), mask)]


@dataclass
class SharedPrefix:
    """A left-padded batch as the prefix every row shares, run once, and each row's rest after it.

    Layout ``[prefix | pad | rest]``: the padding moves between the two, positions stay each row's own
    (``positions`` counts on from the prefix), so a model that runs ``head`` once (batch 1), repeats its
    KV cache over the rows and runs ``tail`` with ``mask`` gives every row its own prompt's logits at the
    ``tail`` positions, up to float rounding. Logits read from the end are the full batch's last ones.
    """

    head: Int[Tensor, "1 shared"]
    tail: Int[Tensor, "batch rest"]
    mask: Int[Tensor, "batch shared_plus_rest"]
    positions: Int[Tensor, "batch rest"]

    @property
    def width(self) -> int:
        """Number of prefix tokens (run once)."""
        return int(self.head.shape[1])

    @property
    def tail_mask(self) -> Int[Tensor, "batch rest"]:
        """The rest's real tokens (``mask`` after the prefix)."""
        return self.mask[:, self.width:]


def shared_prefix_length(b: Batch) -> int:
    """Length of the token prefix every row of a left-padded batch starts with (less one: each row keeps a token)."""
    lengths = b.attention_mask.sum(-1)
    width = int(lengths.min()) - 1
    if len(b) < 2 or width < 1:
        return 0
    start = b.tokens.shape[1] - lengths  # each row's first real token
    cols = (start[:, None] + torch.arange(width, device=b.tokens.device)).clamp(max=b.tokens.shape[1] - 1)
    heads = b.tokens.gather(1, cols)
    same = (heads == heads[:1]).all(0)
    return width if bool(same.all()) else int((~same).nonzero()[0])


def split_shared_prefix(b: Batch, min_shared: int = 8) -> SharedPrefix | None:
    """``b`` as a :class:`SharedPrefix`, or ``None`` when its rows share fewer than ``min_shared`` leading tokens.

    A chat template's system prompt is the usual shared prefix: running it once per batch instead of
    once per row saves that share of every pass over the batch.

    Example:
        >>> from cnt_lens.workflow.testing import tiny_tokenizer
        >>> b = encode(tiny_tokenizer(), ["you are a helpful model . tell me a story",
        ...                               "you are a helpful model . what is this"])
        >>> s = split_shared_prefix(b, min_shared=4)
        >>> s.width, tuple(s.tail.shape), s.positions.tolist()  # row 2 is a token shorter: padded after the prefix
        (6, (2, 4), [[6, 7, 8, 9], [6, 6, 7, 8]])
    """
    shared = shared_prefix_length(b)
    if shared < min_shared:
        return None
    n, width = len(b), b.tokens.shape[1]
    lengths = b.attention_mask.sum(-1)
    head = b.tokens[:1, width - int(lengths[0]):][:, :shared]
    rest = int(lengths.max()) - shared  # the longest prompt's tokens after the prefix
    tail, tail_mask = b.tokens[:, width - rest:], b.attention_mask[:, width - rest:].clone()
    tail_mask[torch.arange(rest, device=tail.device)[None, :] < (rest - (lengths - shared))[:, None]] = 0
    positions = (shared + tail_mask.cumsum(-1) - 1).clamp(min=shared)
    mask = torch.cat([b.attention_mask.new_ones(n, shared), tail_mask], 1)
    return SharedPrefix(head, tail, mask, positions)


def token_limit(tokenizer: Any, max_len: int | None) -> int | None:
    """``max_len``, else the context of the model the tokenizer was loaded with, else its own limit."""
    if max_len is not None:
        if max_len < 2:
            raise ValueError(f"max_len must be ≥ 2 tokens, got {max_len}")
        return max_len
    limit = getattr(tokenizer, "cnt_lens_max_len", None) or getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 10**7 else None


def encode(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    add_bos: bool = False,
    max_len: int | None = None,
    meta: dict[str, Any] | None = None,
) -> Batch:
    """Tokenize ``texts`` (no special tokens added, except BOS if ``add_bos``) into a left-padded batch.

    Chat-formatted texts already hold their special tokens, hence ``add_bos=False`` by default.
    ``max_len`` defaults to the context length of the model the tokenizer was loaded with
    (:func:`~cnt_lens.models.load_model` records it). Longer texts lose tokens from the left, after
    a leading BOS, which is kept, with a warning naming the text.
    """
    if len(texts) == 0:
        raise ValueError("cannot encode an empty list of texts")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; load models with cnt_lens.load_model, which sets one")
    limit = token_limit(tokenizer, max_len)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if add_bos and tokenizer.bos_token_id is not None:
        ids = [[tokenizer.bos_token_id, *x] for x in ids]
    for i, x in enumerate(ids):
        if len(x) == 0:
            raise ValueError(f"text {i} encodes to no tokens: {texts[i]!r}")
        if limit is not None and len(x) > limit:
            head = x[:1] if tokenizer.bos_token_id is not None and x[0] == tokenizer.bos_token_id else []
            warnings.warn(f"text {i} ({texts[i][:40]!r}…) has {len(x)} tokens, more than the model's {limit}; "
                          f"keeping {'BOS and ' if head else ''}its last {limit - len(head)}", stacklevel=2)
            ids[i] = head + x[len(x) - (limit - len(head)):]
    width = max(len(x) for x in ids)
    tokens = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        tokens[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(tokens, mask, positions, dict(meta or {}))


def chunks(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    if size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {size}")
    for i in range(0, len(seq), size):
        yield seq[i:i + size]
