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

Apply and revert are in place and touch only the selected entries. Each model keeps a journal
(:mod:`cnt_lens.core.journal`) of the patches applied to it and the exact values they replaced, so
reverting patches in any order — overlapping ones included — restores the original weights bit for
bit. ``with patch.applied(model):`` is the temporary edit (reverted on exit, errors included);
:meth:`NeuronPatch.apply` the permanent one. The file format is :mod:`cnt_lens.method.patch_file`.

Example (function addition on the planted tiny pair):
    >>> from cnt_lens.workflow.testing import planted_pair
    >>> pair, behaviour, planted = planted_pair("llama", n_planted=6)
    >>> patch = NeuronPatch.from_pair(pair, planted)
    >>> with patch.applied(pair.target):
    ...     behaviour.evaluate(pair.target, None, progress=False)["marker_rate"]
    1.0
    >>> applied_patches(pair.target)
    []
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from cnt_lens.core.files import atomic_dir
from cnt_lens.core.journal import Entry, Weights, applied_patches, entries, position
from cnt_lens.method.patch_file import (
    FORMAT,
    PatchFileError,
    check_sidecar,
    patch_paths,
    read_patch_file,
    write_patch_file,
)
from cnt_lens.method.selection import NeuronScores, NeuronSelection
from cnt_lens.models.forward import Model, model_tokenizer
from cnt_lens.models.hf import fresh_hf_model
from cnt_lens.models.loading import IncompatibleModelsError, package_version
from cnt_lens.models.neurons import neuron_params, read_neurons
from cnt_lens.models.pair import ModelPair, architecture, check_compatible, first_non_finite

__all__ = ["FORMAT", "NeuronPatch", "PatchFileError", "applied_patches", "export_hf", "patch_paths"]


def _check_alpha(alpha: Any) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number, got {alpha!r}") from None
    if not math.isfinite(a):
        raise ValueError(f"alpha must be finite, got {a}: it scales w_donor - w_target")
    return a


def _require_finite(written: list[tuple[int, str, Tensor]], alpha: float) -> None:
    """Raise naming the first (layer, role) whose written values are not all finite (:func:`first_non_finite`)."""
    bad = first_non_finite([((lay, r), t) for lay, r, t in written])
    if bad is not None:
        raise ValueError(f"layer {bad[0]} {bad[1]}: the transplant at alpha {alpha} gives non-finite weights")


@dataclass
class NeuronPatch:
    """Donor weights (and target originals) for a neuron selection; see the module docstring.

    Checked on construction: ``alpha`` and every stored weight are finite, and each layer holds one
    row per selected neuron. Two patches with the same :attr:`content_hash` (neurons, weights, alpha)
    are the same patch: a model takes it once, whichever copy is applied.
    """

    selection: NeuronSelection
    donor: Weights
    target: Weights
    architecture: dict[str, Any]
    alpha: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)
    _hash: str | None = field(default=None, init=False, repr=False, compare=False)
    _index: dict[tuple[int, str], Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

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
        for layer in layers:
            if set(self.donor[layer]) != set(self.target[layer]):
                raise ValueError(f"layer {layer}: donor weights for {sorted(self.donor[layer])}, target originals for "
                                 f"{sorted(self.target[layer])}; a patch holds both for every weight it writes")

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
        """Number of neurons the patch writes."""
        return self.selection.n

    def __eq__(self, other: object) -> bool:
        """Same patch: same neurons, alpha and donor weights (:attr:`content_hash`), wherever it was taken from."""
        return isinstance(other, NeuronPatch) and self.content_hash == other.content_hash

    def __repr__(self) -> str:
        layers = self.selection.per_layer()
        roles = sorted({role for by_role in self.donor.values() for role in by_role})
        return (f"NeuronPatch(n={self.n} ({self.selection.fraction:.2%}) in {sum(1 for c in layers if c)} of "
                f"{len(layers)} layers, alpha={self.alpha:g}, roles={roles}, donor={self.meta.get('donor', '?')!r}, "
                f"hash={self.content_hash[:12]})")

    @property
    def content_hash(self) -> str:
        """sha256 of what the patch writes: the neuron mask, alpha and the donor's weights (hex)."""
        if self._hash is None:
            h = hashlib.sha256()
            h.update(self.selection.mask.to(torch.uint8).numpy().tobytes())
            h.update(repr(self.alpha).encode())
            _hash_weights(h, self.donor)
            self._hash = h.hexdigest()
        return self._hash

    @property
    def target_hash(self) -> str:
        """sha256 of the target's original weights the patch holds (what :meth:`restore` writes back; hex).

        Apart from :attr:`content_hash`, which says what the patch *is*: two patches that write the same thing
        are the same patch whatever model they were taken from; this one guards the saved originals.
        """
        h = hashlib.sha256()
        _hash_weights(h, self.target)
        return h.hexdigest()

    # ------------------------------------------------------------------ apply / revert

    def check_fits(self, model: Model) -> None:
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

    def _indices(self, layer: int, device: torch.device) -> Tensor:
        """The selected neurons of ``layer`` on ``device`` (cached: apply and revert run in loops)."""
        key = (layer, str(device))
        if key not in self._index:
            self._index[key] = self.selection.layer_indices(layer).to(device)
        return self._index[key]

    def _write(self, model: Model) -> Weights:
        """Write the transplant; return the values it replaced. All or nothing: any error restores them.

        Finiteness is checked once, after every write (one synchronisation instead of one per tensor),
        and a non-finite result is rolled back like any other error.
        """
        saved: Weights = {}
        written: list[tuple[int, str, Tensor]] = []
        try:
            with torch.no_grad():
                for layer, roles in self.donor.items():
                    saved[layer] = {}
                    for p in neuron_params(model, layer):
                        i = self._indices(layer, p.tensor.device)
                        current = p.tensor.index_select(p.axis, i)
                        donor = roles[p.role].to(device=p.tensor.device, dtype=p.tensor.dtype).movedim(0, p.axis)
                        new = torch.lerp(current, donor, self.alpha)
                        written.append((layer, p.role, new))
                        saved[layer][p.role] = current
                        p.tensor.index_copy_(p.axis, i, new)
                _require_finite(written, self.alpha)
        except BaseException:
            self._restore(model, self, saved)
            raise
        return saved

    @staticmethod
    def _restore(model: Model, patch: "NeuronPatch", saved: Weights) -> None:
        with torch.no_grad():
            for layer, roles in saved.items():
                for p in neuron_params(model, layer):
                    if p.role in roles:
                        p.tensor.index_copy_(p.axis, patch._indices(layer, p.tensor.device), roles[p.role])

    def apply(self, model: Model) -> Any:
        """Write the transplant into ``model`` in place (permanent until :meth:`revert`); return ``model``.

        Checked first (:meth:`check_fits`), then all or nothing. A patch of the same content
        (:attr:`content_hash`), this object or a copy, is refused while applied.
        """
        self.check_fits(model)
        if position(model, self.content_hash) is not None:
            raise ValueError("a patch with this content is already applied to this model; revert it first")
        entries(model).append(Entry(self.content_hash, self, self._write(model)))
        return model

    def revert(self, model: Model) -> Any:
        """Undo :meth:`apply` of this patch (or a copy of it) on ``model``, whatever was applied after it."""
        journal = entries(model)
        pos = position(model, self.content_hash)
        if pos is None:
            raise ValueError("this patch is not applied to this model (use restore() to write the target's "
                             "original weights into a model patched elsewhere)")
        later = journal[pos + 1:]
        for entry in reversed(later):  # peel later patches off, exactly
            self._restore(model, entry.patch, entry.saved)
        self._restore(model, journal[pos].patch, journal[pos].saved)
        del journal[pos:]
        for entry in later:  # and put them back on the restored weights
            journal.append(Entry(entry.key, entry.patch, entry.patch._write(model)))
        return model

    @contextlib.contextmanager
    def applied(self, model: Model) -> Iterator[Any]:
        """Temporary edit: ``with patch.applied(model): ...`` applies, yields ``model`` and reverts on exit.

        The revert runs on errors and interrupts too, so the model leaves the block as it entered.
        """
        self.apply(model)
        try:
            yield model
        finally:
            self.revert(model)

    def restore(self, model: Model, *, force: bool = False) -> Any:
        """Write the *target's* original values of the selected neurons into ``model`` (no journal).

        For a model patched elsewhere, e.g. one loaded from an exported checkpoint. The model must hold what
        this patch writes (``w_target + alpha (w_donor - w_target)``, to the rounding of its dtype) or already
        the originals (then nothing changes): restoring any other model would write this target's weights into
        it. ``force=True`` writes them whatever the model holds.
        """
        self.check_fits(model)
        if not force:
            state = self._state(model)
            if state == "original":
                return model
            if state != "patched":
                raise ValueError(f"this model does not hold this patch: {state}; restore() would write another "
                                 "model's weights into it (restore(model, force=True) if that is meant)")
        with torch.no_grad():
            for layer, roles in self.target.items():
                for p in neuron_params(model, layer):
                    value = roles[p.role].to(device=p.tensor.device, dtype=p.tensor.dtype).movedim(0, p.axis)
                    p.tensor.index_copy_(p.axis, self._indices(layer, p.tensor.device), value)
        return model

    def _state(self, model: Model) -> str:
        """``"patched"``, ``"original"``, or where the model's selected weights are neither (a sentence)."""
        differs: dict[str, str] = {}
        with torch.no_grad():
            for layer, roles in self.target.items():
                for p in neuron_params(model, layer):
                    have = p.tensor.index_select(p.axis, self._indices(layer, p.tensor.device)).movedim(p.axis, 0)
                    original = roles[p.role].to(device=have.device, dtype=have.dtype)
                    donor = self.donor[layer][p.role].to(device=have.device, dtype=have.dtype)
                    tol = {"rtol": 1e-4, "atol": 1e-6} if have.dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
                    for state, expected in (("patched", torch.lerp(original, donor, self.alpha)), ("original", original)):
                        if state not in differs and not torch.allclose(have, expected, **tol):
                            diff = float((have.float() - expected.float()).abs().max())
                            differs[state] = f"layer {layer} {p.role} differs from the patched values by up to {diff:.3g}"
        if "patched" not in differs:
            return "patched"
        return "original" if "original" not in differs else differs["patched"] + " and from the originals too"

    # ------------------------------------------------------------------ files

    def header(self) -> dict[str, Any]:
        """The JSON header stored in the .safetensors file (and, with the selection, in the sidecar)."""
        return {"format": FORMAT, "alpha": self.alpha, "architecture": self.architecture, "meta": self.meta,
                "content_hash": self.content_hash, "target_hash": self.target_hash}

    def save(self, path: str | Path) -> Path:
        """Write ``NAME.safetensors`` (the patch) and ``NAME.json`` (a readable sidecar); return the first.

        ``path`` may end in ``.safetensors``, ``.json`` or neither (:func:`~cnt_lens.method.patch_file.patch_paths`).
        Each file is written atomically; the sidecar carries the content hash, which :meth:`load` checks.
        """
        return write_patch_file(path, self.selection, self.donor, self.target, self.header())

    @classmethod
    def load(cls, path: str | Path, model: Model | None = None) -> "NeuronPatch":
        """Read a saved patch; with ``model``, refuse (before anything is written) if it does not fit.

        The .safetensors file is the patch; a sidecar .json beside it must describe the same content.
        """
        header, mask, donor, target = read_patch_file(path)
        st, _ = patch_paths(path)
        try:
            sel = NeuronSelection(mask, source=header["meta"].get("selection_source", "loaded"))
            patch = cls(sel, donor, target, header["architecture"], header["alpha"], header["meta"])
        except (KeyError, TypeError, ValueError) as err:
            raise PatchFileError(f"{st}: not a valid cnt_lens patch ({err}); re-save it") from err
        if "content_hash" in header and header["content_hash"] != patch.content_hash:
            raise PatchFileError(f"{st}: its weights do not match the content hash in its own header; "
                                 "the file is damaged: re-save the patch")
        if "target_hash" in header and header["target_hash"] != patch.target_hash:
            raise PatchFileError(f"{st}: its stored target weights (target.* tensors, what restore() writes back) do "
                                 "not match the target hash in its own header; the file was changed: re-save the patch")
        check_sidecar(path, header, patch.selection)
        if model is not None:
            patch.check_fits(model)
        return patch


def _hash_weights(h: Any, store: Weights) -> None:
    """Feed every tensor of ``store`` to the hash ``h``: name, dtype, shape and bytes, in (layer, role) order."""
    for layer in sorted(store):
        for role in sorted(store[layer]):
            t = store[layer][role].detach().contiguous().cpu()
            h.update(f"{layer}.{role}.{t.dtype}.{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def export_hf(model: Model, directory: str | Path, *, overwrite: bool = False) -> Path:
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
