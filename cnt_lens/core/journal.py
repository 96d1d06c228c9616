"""What a model remembers of the patches applied to it: one entry per patch, oldest first.

The journal lives in the model's ``__dict__`` (so it follows the model object, not a global
registry) and holds, per applied patch, its content hash, the patch and the exact values its
write replaced. :meth:`cnt_lens.NeuronPatch.revert` peels later entries off to undo an earlier one
bit for bit; nothing else writes here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor

__all__ = ["Entry", "Weights", "applied_patches", "entries", "position"]

Weights = dict[int, dict[str, Tensor]]
"""Per layer, per weight role (``W_in``, ``W_gate``, ``b_in``, ``W_out``): one row per selected neuron."""

_KEY = "_cnt_lens_journal"


class Entry(NamedTuple):
    """One applied patch: its content hash, the patch object and the values its write replaced."""

    key: str
    patch: Any
    saved: Weights


def entries(model: Any) -> list[Entry]:
    """The model's journal (a live list: appending to it records an application)."""
    return model.__dict__.setdefault(_KEY, [])


def position(model: Any, key: str) -> int | None:
    """Index of the entry with content hash ``key``, or ``None`` when no such patch is applied."""
    return next((i for i, e in enumerate(entries(model)) if e.key == key), None)


def applied_patches(model: Any) -> list[Any]:
    """Patches currently applied to ``model``, oldest first (empty for a model never patched)."""
    return [e.patch for e in entries(model)]
