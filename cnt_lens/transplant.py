"""Weight-space transplants of selected MLP neurons: build, apply, revert, save, load, export.

A :class:`NeuronPatch` holds, for every selected neuron, the donor's weights and the target's
originals (every tensor entry that belongs to the neuron: ``W_gate``/``W_in`` columns, ``b_in``
entry, ``W_out`` row). Applying it sets each selected entry to::

    w ← w + alpha · (w_donor − w)        (torch.lerp; alpha = 1 writes w_donor exactly)

where ``w`` is the model's current value — the target's own weight when applied to the target,
which gives ``w_target + alpha (w_donor − w_target)``. ``alpha > 1`` extrapolates the change.

* **Function addition** (target gains the donor's behaviour, e.g. refusal): donor = aligned model.
* **Function deletion** (target loses a behaviour, e.g. bias, or refusal in a red-team test):
  donor = a model *without* the behaviour; the same patch removes it from the target.

Apply and revert are in place and touch only the selected entries. Each model keeps a journal of
the patches applied to it and the exact values they replaced, so reverting patches in any order —
overlapping ones included — restores the original weights bit for bit.

Example (function addition on the planted tiny pair):
    >>> from cnt_lens.testing import planted_pair
    >>> pair, behaviour, planted = planted_pair("llama", n_planted=6)
    >>> patch = NeuronPatch.from_pair(pair, planted)
    >>> _ = patch.apply(pair.target)
    >>> behaviour.evaluate(pair.target, None, progress=False)["marker_rate"]
    1.0
    >>> _ = patch.revert(pair.target)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .models import (
    IncompatibleModelsError,
    ModelPair,
    architecture,
    check_compatible,
    fresh_hf_model,
    model_tokenizer,
    neuron_params,
    read_neurons,
)
from .selection import NeuronScores, NeuronSelection

__all__ = ["NeuronPatch", "export_hf"]

_JOURNAL = "_cnt_lens_journal"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("cnt_lens")
    except Exception:  # pragma: no cover - source checkout without metadata
        return "unknown"


def _journal(model: Any) -> list[tuple["NeuronPatch", dict[int, dict[str, Tensor]]]]:
    if _JOURNAL not in model.__dict__:
        model.__dict__[_JOURNAL] = []
    return model.__dict__[_JOURNAL]


@dataclass
class NeuronPatch:
    """Donor weights (and target originals) for a neuron selection; see the module docstring."""

    selection: NeuronSelection
    donor: dict[int, dict[str, Tensor]]
    target: dict[int, dict[str, Tensor]]
    architecture: dict[str, Any]
    alpha: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pair(cls, pair: ModelPair, selection: NeuronSelection, alpha: float = 1.0, *,
                  scores: NeuronScores | None = None, meta: dict[str, Any] | None = None) -> "NeuronPatch":
        """Take the selected neurons' weights from ``pair.donor`` (and originals from ``pair.target``)."""
        if selection.shape != (pair.n_layers, pair.d_mlp):
            raise ValueError(f"selection is {selection.shape}, the pair is {(pair.n_layers, pair.d_mlp)}")
        donor, target = {}, {}
        for layer in range(pair.n_layers):
            idx = selection.layer_indices(layer)
            if idx.numel():
                donor[layer] = read_neurons(pair.donor, layer, idx)
                target[layer] = read_neurons(pair.target, layer, idx)
        info = {
            "donor": str(getattr(pair.donor, "cnt_source", "?")),
            "target": str(getattr(pair.target, "cnt_source", "?")),
            "selection_source": selection.source,
            "n_neurons": selection.n,
            "per_layer": selection.per_layer(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "cnt_lens_version": _version(),
            **({"scores": scores.summary()} if scores is not None else {}),
            **(meta or {}),
        }
        return cls(selection, donor, target, architecture(pair.target), float(alpha), info)

    def with_alpha(self, alpha: float) -> "NeuronPatch":
        """The same neurons with another scale (shares the weight tensors; a distinct patch)."""
        return replace(self, alpha=float(alpha), meta=dict(self.meta))

    @property
    def n(self) -> int:
        return self.selection.n

    # ------------------------------------------------------------------ apply / revert

    def check_fits(self, model: Any) -> None:
        """Raise :class:`IncompatibleModelsError` unless ``model`` has this patch's shapes."""
        try:
            check_compatible(self.architecture, architecture(model))
        except IncompatibleModelsError as err:
            raise IncompatibleModelsError(f"patch does not fit this model: {err}") from None
        for layer, roles in self.donor.items():
            have = {p.role: p for p in neuron_params(model, layer)}
            if set(have) != set(roles):
                raise IncompatibleModelsError(f"layer {layer}: patch holds {sorted(roles)}, model has {sorted(have)}")
            for role, t in roles.items():
                p = have[role]
                expected = p.tensor.shape[: p.axis] + p.tensor.shape[p.axis + 1:]
                if tuple(t.shape[1:]) != tuple(expected):
                    raise IncompatibleModelsError(f"layer {layer} {role}: patch rows {tuple(t.shape[1:])}, "
                                                  f"model {tuple(expected)}")

    def _write(self, model: Any, save: bool) -> dict[int, dict[str, Tensor]]:
        saved: dict[int, dict[str, Tensor]] = {}
        with torch.no_grad():
            for layer, roles in self.donor.items():
                idx = self.selection.layer_indices(layer)
                saved[layer] = {}
                for p in neuron_params(model, layer):
                    i = idx.to(p.tensor.device)
                    current = p.tensor.index_select(p.axis, i)
                    if save:
                        saved[layer][p.role] = current
                    donor = roles[p.role].to(device=p.tensor.device, dtype=p.tensor.dtype).movedim(0, p.axis)
                    p.tensor.index_copy_(p.axis, i, torch.lerp(current, donor, self.alpha))
        return saved

    @staticmethod
    def _restore(model: Any, patch: "NeuronPatch", saved: dict[int, dict[str, Tensor]]) -> None:
        with torch.no_grad():
            for layer, roles in saved.items():
                idx = patch.selection.layer_indices(layer)
                for p in neuron_params(model, layer):
                    p.tensor.index_copy_(p.axis, idx.to(p.tensor.device), roles[p.role])

    def apply(self, model: Any) -> Any:
        """Write the transplant into ``model`` in place (checked first; nothing is written on mismatch)."""
        self.check_fits(model)
        journal = _journal(model)
        if any(p is self for p, _ in journal):
            raise ValueError("this patch is already applied to this model; revert it first")
        journal.append((self, self._write(model, save=True)))
        return model

    def revert(self, model: Any) -> Any:
        """Undo :meth:`apply` on ``model``, whatever patches were applied after it."""
        journal = _journal(model)
        pos = next((i for i, (p, _) in enumerate(journal) if p is self), None)
        if pos is None:
            raise ValueError("this patch is not applied to this model (use restore() to write the target's "
                             "original weights into a model patched elsewhere)")
        later = journal[pos + 1:]
        for patch, saved in reversed(later):  # peel later patches off, exactly
            self._restore(model, patch, saved)
        self._restore(model, self, journal[pos][1])
        del journal[pos:]
        for patch, _ in later:  # and put them back on the restored weights
            journal.append((patch, patch._write(model, save=True)))
        return model

    def restore(self, model: Any) -> Any:
        """Write the *target's* original values of the selected neurons into ``model`` (no journal).

        For a model patched in another session, e.g. one loaded from an exported checkpoint.
        """
        self.check_fits(model)
        with torch.no_grad():
            for layer, roles in self.target.items():
                idx = self.selection.layer_indices(layer)
                for p in neuron_params(model, layer):
                    value = roles[p.role].to(device=p.tensor.device, dtype=p.tensor.dtype).movedim(0, p.axis)
                    p.tensor.index_copy_(p.axis, idx.to(p.tensor.device), value)
        return model

    @staticmethod
    def applied(model: Any) -> list["NeuronPatch"]:
        """Patches currently applied to ``model``, oldest first."""
        return [p for p, _ in _journal(model)]

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (safetensors: weights + selection) and ``path`` with ``.json`` (metadata)."""
        from safetensors.torch import save_file

        path = Path(path).with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"selection": self.selection.mask.to(torch.uint8)}
        for side, store in (("donor", self.donor), ("target", self.target)):
            for layer, roles in store.items():
                for role, t in roles.items():
                    tensors[f"{side}.{layer}.{role}"] = t.contiguous().cpu()
        header = {"alpha": self.alpha, "architecture": self.architecture, "meta": self.meta,
                  "format": "cnt_lens.NeuronPatch/1"}
        save_file(tensors, str(path), metadata={"cnt_lens": json.dumps(header, default=str)})
        path.with_suffix(".json").write_text(json.dumps({**header, "selection": self.selection.to_json()},
                                                        indent=1, default=str))
        return path

    @classmethod
    def load(cls, path: str | Path, model: Any | None = None) -> "NeuronPatch":
        """Read a saved patch; with ``model``, refuse (before anything is written) if it does not fit."""
        from safetensors import safe_open

        path = Path(path).with_suffix(".safetensors")
        if not path.is_file():
            raise FileNotFoundError(f"no patch file at {path}")
        with safe_open(str(path), framework="pt") as f:
            header = json.loads(f.metadata()["cnt_lens"])
            mask = f.get_tensor("selection").bool()
            donor: dict[int, dict[str, Tensor]] = {}
            target: dict[int, dict[str, Tensor]] = {}
            for key in f.keys():
                if key == "selection":
                    continue
                side, layer, role = key.split(".")
                (donor if side == "donor" else target).setdefault(int(layer), {})[role] = f.get_tensor(key)
        sel = NeuronSelection(mask, source=header["meta"].get("selection_source", "loaded"))
        for layer, roles in donor.items():
            n = int(sel.mask[layer].sum())
            if any(t.shape[0] != n for t in roles.values()):
                raise ValueError(f"{path}: layer {layer} holds rows for a different selection")
        patch = cls(sel, donor, target, header["architecture"], float(header["alpha"]), header["meta"])
        if model is not None:
            patch.check_fits(model)
        return patch


def export_hf(model: Any, directory: str | Path) -> Path:
    """Save ``model`` (patched or not) as a standard HF checkpoint with its tokenizer.

    ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` then gives the hooked model's
    logits; this is how a transplanted model reaches transformers, vLLM or any serving stack.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fresh_hf_model(model).save_pretrained(directory, safe_serialization=True)
    model_tokenizer(model).save_pretrained(directory)
    return directory
