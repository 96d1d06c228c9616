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

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from .files import atomic_dir, atomic_write, atomic_write_text
from .models import (
    IncompatibleModelsError,
    ModelPair,
    architecture,
    check_compatible,
    fresh_hf_model,
    model_tokenizer,
    neuron_params,
    package_version,
    read_neurons,
)
from .selection import NeuronScores, NeuronSelection

__all__ = ["FORMAT", "NeuronPatch", "PatchFileError", "export_hf", "patch_paths"]

FORMAT = "cnt_lens.NeuronPatch/2"
"""File format written by :meth:`NeuronPatch.save`. ``/1`` (no content hash) is still read."""
_READABLE = ("cnt_lens.NeuronPatch/1", FORMAT)
_JOURNAL = "_cnt_lens_journal"


class PatchFileError(ValueError):
    """A patch file that cannot be read as one: damaged, of an unknown format, or not matching its sidecar."""


def _check_alpha(alpha: Any) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number, got {alpha!r}") from None
    if not math.isfinite(a):
        raise ValueError(f"alpha must be finite, got {a}: it scales w_donor - w_target")
    return a


def _journal(model: Any) -> list[tuple[str, "NeuronPatch", dict[int, dict[str, Tensor]]]]:
    """``(content hash, patch, replaced values)`` per applied patch, oldest first; kept on the model."""
    return model.__dict__.setdefault(_JOURNAL, [])


@dataclass
class NeuronPatch:
    """Donor weights (and target originals) for a neuron selection; see the module docstring.

    Checked on construction: ``alpha`` and every stored weight are finite, and each layer holds one
    row per selected neuron. Two patches with the same :attr:`content_hash` (neurons, weights, alpha)
    are the same patch: a model takes it once, whichever copy is applied.
    """

    selection: NeuronSelection
    donor: dict[int, dict[str, Tensor]]
    target: dict[int, dict[str, Tensor]]
    architecture: dict[str, Any]
    alpha: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)
    _hash: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.alpha = _check_alpha(self.alpha)
        for side, store in (("donor", self.donor), ("target", self.target)):
            for layer, roles in store.items():
                if not 0 <= layer < self.selection.shape[0]:
                    raise ValueError(f"{side} weights for layer {layer}, outside the selection's "
                                     f"{self.selection.shape[0]} layers")
                n = int(self.selection.mask[layer].sum())
                for role, t in roles.items():
                    if t.shape[0] != n:
                        raise ValueError(f"{side} layer {layer} {role}: {t.shape[0]} rows for {n} selected neurons")
                    if not torch.isfinite(t).all():
                        raise ValueError(f"{side} layer {layer} {role}: non-finite weights (NaN/inf); a transplant "
                                         "would write them into the model")
        layers = {int(x) for x in self.selection.mask.any(-1).nonzero().flatten()}
        if set(self.donor) != layers or set(self.target) != layers:
            raise ValueError(f"patch weights cover layers {sorted(self.donor)}, the selection {sorted(layers)}")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pair(cls, pair: ModelPair, selection: NeuronSelection, alpha: float = 1.0, *,
                  scores: NeuronScores | None = None, meta: dict[str, Any] | None = None) -> "NeuronPatch":
        """Take the selected neurons' weights from ``pair.donor`` (and originals from ``pair.target``)."""
        alpha = _check_alpha(alpha)
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
            "cnt_lens_version": package_version("cnt_lens", "unknown"),
            **({"scores": scores.summary()} if scores is not None else {}),
            **(meta or {}),
        }
        return cls(selection, donor, target, architecture(pair.target), alpha, info)

    def with_alpha(self, alpha: float) -> "NeuronPatch":
        """The same neurons with another scale (shares the weight tensors; a distinct patch)."""
        return replace(self, alpha=_check_alpha(alpha), meta=dict(self.meta))

    @property
    def n(self) -> int:
        return self.selection.n

    @property
    def content_hash(self) -> str:
        """sha256 of what the patch writes: the neuron mask, alpha and the donor's weights (hex)."""
        if self._hash is None:
            h = hashlib.sha256()
            h.update(self.selection.mask.to(torch.uint8).numpy().tobytes())
            h.update(repr(self.alpha).encode())
            for layer in sorted(self.donor):
                for role in sorted(self.donor[layer]):
                    t = self.donor[layer][role].detach().contiguous().cpu()
                    h.update(f"{layer}.{role}.{t.dtype}.{tuple(t.shape)}".encode())
                    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._hash = h.hexdigest()
        return self._hash

    # ------------------------------------------------------------------ apply / revert

    def check_fits(self, model: Any) -> None:
        """Raise :class:`IncompatibleModelsError` unless ``model`` has this patch's shapes (writes nothing)."""
        try:
            check_compatible(self.architecture, architecture(model))
        except IncompatibleModelsError as err:
            raise IncompatibleModelsError(f"patch does not fit this model: {err}") from None
        shape = (int(model.cfg.n_layers), int(model.cfg.d_mlp))
        if self.selection.shape != shape:
            raise IncompatibleModelsError(f"patch selection is {self.selection.shape} (layers, neurons), "
                                          f"the model {shape}")
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

    def _write(self, model: Any) -> dict[int, dict[str, Tensor]]:
        """Write the transplant; return the values it replaced. All or nothing: any error restores them."""
        saved: dict[int, dict[str, Tensor]] = {}
        try:
            with torch.no_grad():
                for layer, roles in self.donor.items():
                    idx = self.selection.layer_indices(layer)
                    saved[layer] = {}
                    for p in neuron_params(model, layer):
                        i = idx.to(p.tensor.device)
                        current = p.tensor.index_select(p.axis, i)
                        donor = roles[p.role].to(device=p.tensor.device, dtype=p.tensor.dtype).movedim(0, p.axis)
                        new = torch.lerp(current, donor, self.alpha)
                        if not torch.isfinite(new).all():
                            raise ValueError(f"layer {layer} {p.role}: the transplant at alpha {self.alpha} gives "
                                             "non-finite weights")
                        saved[layer][p.role] = current
                        p.tensor.index_copy_(p.axis, i, new)
        except BaseException:
            self._restore(model, self, saved)
            raise
        return saved

    @staticmethod
    def _restore(model: Any, patch: "NeuronPatch", saved: dict[int, dict[str, Tensor]]) -> None:
        with torch.no_grad():
            for layer, roles in saved.items():
                idx = patch.selection.layer_indices(layer)
                for p in neuron_params(model, layer):
                    if p.role in roles:
                        p.tensor.index_copy_(p.axis, idx.to(p.tensor.device), roles[p.role])

    def apply(self, model: Any) -> Any:
        """Write the transplant into ``model`` in place: checked first, then all or nothing.

        A patch of the same content (:attr:`content_hash`), this object or a copy, is refused while applied.
        """
        self.check_fits(model)
        journal = _journal(model)
        if any(h == self.content_hash for h, _, _ in journal):
            raise ValueError("a patch with this content is already applied to this model; revert it first")
        journal.append((self.content_hash, self, self._write(model)))
        return model

    def revert(self, model: Any) -> Any:
        """Undo :meth:`apply` of this patch (or a copy of it) on ``model``, whatever was applied after it."""
        journal = _journal(model)
        pos = next((i for i, (h, _, _) in enumerate(journal) if h == self.content_hash), None)
        if pos is None:
            raise ValueError("this patch is not applied to this model (use restore() to write the target's "
                             "original weights into a model patched elsewhere)")
        later = journal[pos + 1:]
        for _, patch, saved in reversed(later):  # peel later patches off, exactly
            self._restore(model, patch, saved)
        self._restore(model, journal[pos][1], journal[pos][2])
        del journal[pos:]
        for h, patch, _ in later:  # and put them back on the restored weights
            journal.append((h, patch, patch._write(model)))
        return model

    @contextlib.contextmanager
    def applied_to(self, model: Any) -> Iterator[Any]:
        """Temporarily apply: ``with patch.applied_to(model): ...`` reverts on exit, errors included."""
        self.apply(model)
        try:
            yield model
        finally:
            self.revert(model)

    def restore(self, model: Any) -> Any:
        """Write the *target's* original values of the selected neurons into ``model`` (no journal).

        For a model patched elsewhere, e.g. one loaded from an exported checkpoint.
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
        return [p for _, p, _ in _journal(model)]

    # ------------------------------------------------------------------ files

    def header(self) -> dict[str, Any]:
        """The JSON header stored in the .safetensors file (and, with the selection, in the sidecar)."""
        return {"format": FORMAT, "alpha": self.alpha, "architecture": self.architecture, "meta": self.meta,
                "content_hash": self.content_hash}

    def save(self, path: str | Path) -> Path:
        """Write ``NAME.safetensors`` (weights, selection, header: the patch) and ``NAME.json`` (a readable sidecar).

        ``path`` may end in ``.safetensors``, ``.json`` or neither; any other dots stay in the name
        (``patch_a4.0`` → ``patch_a4.0.safetensors``). Each file is written atomically; the sidecar
        carries the patch's content hash, which :meth:`load` checks against the weights.
        """
        from safetensors.torch import save_file

        st, sidecar = patch_paths(path)
        tensors = {"selection": self.selection.mask.to(torch.uint8)}
        for side, store in (("donor", self.donor), ("target", self.target)):
            for layer, roles in store.items():
                for role, t in roles.items():
                    tensors[f"{side}.{layer}.{role}"] = t.contiguous().cpu()
        header = self.header()
        atomic_write(st, lambda tmp: save_file(tensors, str(tmp), metadata={"cnt_lens": json.dumps(header,
                                                                                                   default=str)}))
        atomic_write_text(sidecar, json.dumps({**header, "selection": self.selection.to_json()}, indent=1,
                                              default=str))
        return st

    @classmethod
    def load(cls, path: str | Path, model: Any | None = None) -> "NeuronPatch":
        """Read a saved patch; with ``model``, refuse (before anything is written) if it does not fit.

        The .safetensors file is the patch; a sidecar .json beside it must describe the same content.
        """
        st, sidecar = patch_paths(path)
        if not st.is_file():
            raise FileNotFoundError(f"no patch file at {st}")
        header, mask, donor, target = _read_patch_file(st)
        if header.get("format") not in _READABLE:
            raise PatchFileError(f"{st}: format {header.get('format')!r} is not one this cnt_lens reads "
                                 f"({', '.join(_READABLE)}); upgrade cnt_lens or re-save the patch")
        try:
            sel = NeuronSelection(mask, source=header["meta"].get("selection_source", "loaded"))
            patch = cls(sel, donor, target, header["architecture"], header["alpha"], header["meta"])
        except (KeyError, TypeError, ValueError) as err:
            raise PatchFileError(f"{st}: not a valid cnt_lens patch ({err}); re-save it") from err
        if "content_hash" in header and header["content_hash"] != patch.content_hash:
            raise PatchFileError(f"{st}: its weights do not match the content hash in its own header; "
                                 "the file is damaged: re-save the patch")
        _check_sidecar(sidecar, st, patch)
        if model is not None:
            patch.check_fits(model)
        return patch


def patch_paths(path: str | Path) -> tuple[Path, Path]:
    """(``NAME.safetensors``, ``NAME.json``) for a patch path given with either suffix or none."""
    p = Path(path)
    stem = p.name[: -len(p.suffix)] if p.suffix in (".safetensors", ".json") else p.name
    if not stem:
        raise ValueError(f"patch path {path!r} has no file name")
    return p.with_name(stem + ".safetensors"), p.with_name(stem + ".json")


def _read_patch_file(st: Path) -> tuple[dict[str, Any], Tensor, dict[int, dict[str, Tensor]], dict[int, dict[str, Tensor]]]:
    """(header, mask, donor, target) of a patch file, or :class:`PatchFileError` naming the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(st), framework="pt") as f:
            header = json.loads((f.metadata() or {})["cnt_lens"])
            mask = f.get_tensor("selection").bool()
            donor: dict[int, dict[str, Tensor]] = {}
            target: dict[int, dict[str, Tensor]] = {}
            for key in f.keys():
                if key == "selection":
                    continue
                side, layer, role = key.split(".")
                if side not in ("donor", "target"):
                    raise ValueError(f"unexpected tensor {key!r}")
                (donor if side == "donor" else target).setdefault(int(layer), {})[role] = f.get_tensor(key)
    except KeyError as err:
        raise PatchFileError(f"{st}: no cnt_lens header or selection ({err}); not a cnt_lens patch") from err
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise PatchFileError(f"{st}: not a readable cnt_lens patch ({type(err).__name__}: {err}); "
                             "the file is damaged or not a patch: re-save it") from err
    return header, mask, donor, target


def _check_sidecar(sidecar: Path, st: Path, patch: NeuronPatch) -> None:
    if not sidecar.is_file():
        return
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PatchFileError(f"{sidecar}: damaged sidecar of {st} ({err}); delete it or re-save the patch") from err
    if "content_hash" not in data:
        return  # format /1 sidecars carry no hash
    if data["content_hash"] != patch.content_hash or NeuronSelection.from_json(data["selection"]) != patch.selection:
        raise PatchFileError(f"{sidecar} does not describe {st} (another save wrote one of them): the "
                             f".safetensors file is the patch; re-save it, or delete {sidecar.name}")


def export_hf(model: Any, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Save ``model`` (patched or not) as a standard HF checkpoint with its tokenizer.

    ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` then gives the hooked model's
    logits; this is how a transplanted model reaches transformers, vLLM or any serving stack.
    The checkpoint is written to a temporary directory and renamed into place; an existing
    ``directory`` is refused unless ``overwrite``.
    """
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        fresh_hf_model(model).save_pretrained(tmp, safe_serialization=True)
        model_tokenizer(model).save_pretrained(tmp)
    return Path(directory)
