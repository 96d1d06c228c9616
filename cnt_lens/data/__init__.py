"""The data layer: prompt sets and model inputs.

:mod:`~cnt_lens.data.prompt_set` (the bundled sets, splits, cross-distribution roles),
:mod:`~cnt_lens.data.tokens` (chat format, padded batches), :mod:`~cnt_lens.data.formats` (public
benchmarks' files, read by path) and :mod:`~cnt_lens.data.rows` (their rows, with line numbers).
Prompt sets and inputs are re-exported here.
"""

from __future__ import annotations

from cnt_lens.data.prompt_set import (
    BUNDLED,
    CROSS_ROLES,
    FIELDS,
    SPLITS,
    PromptSet,
    combine,
    cross_distribution,
    cross_harmful,
    cross_harmless,
    default_harmful,
    default_harmless,
    load_prompts,
    lone_surrogate,
    record_problem,
    stable_split,
    with_defaults,
)
from cnt_lens.data.tokens import (
    Batch,
    SharedPrefix,
    chat_format,
    chunks,
    encode,
    escape_special_tokens,
    shared_prefix_length,
    split_shared_prefix,
)

__all__ = ["BUNDLED", "Batch", "FIELDS", "PromptSet", "CROSS_ROLES", "SPLITS", "SharedPrefix", "chat_format", "chunks", "combine", "cross_distribution", "cross_harmful", "cross_harmless", "default_harmful", "default_harmless", "encode", "escape_special_tokens", "load_prompts", "lone_surrogate", "record_problem", "shared_prefix_length", "split_shared_prefix", "stable_split", "with_defaults"]
