"""The on-disk form of a :class:`cnt_lens.NeuronPatch`: ``NAME.safetensors`` plus a ``NAME.json`` sidecar.

The .safetensors file is the patch: a ``selection`` mask (uint8, layers × neurons), one tensor per
``{donor|target}.{layer}.{role}`` (rows = selected neurons of that layer, in index order) and a
JSON header under the metadata key ``cnt_lens`` (format, alpha, architecture, meta, content hash).
The sidecar repeats the header with the selection in readable form; when both exist they must
describe the same content, so a half-finished pair of writes is caught on load, not applied.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cnt_lens.core.errors import CntLensError
from cnt_lens.core.files import atomic_write, atomic_write_text
from cnt_lens.core.journal import Weights
from cnt_lens.method.selection import NeuronSelection

__all__ = ["FORMAT", "READABLE", "PatchFileError", "patch_paths", "read_patch_file", "write_patch_file"]

FORMAT = "cnt_lens.NeuronPatch/2"
"""File format written by :meth:`cnt_lens.NeuronPatch.save`. ``/1`` (no content hash) is still read."""
READABLE = ("cnt_lens.NeuronPatch/1", FORMAT)


class PatchFileError(CntLensError, ValueError):
    """A patch file that cannot be read as one: damaged, of an unknown format, or not matching its sidecar."""


def patch_paths(path: str | Path) -> tuple[Path, Path]:
    """(``NAME.safetensors``, ``NAME.json``) for a patch path given with either suffix or none.

    Any other dots stay in the name: ``patch_a4.0`` → ``patch_a4.0.safetensors``.

    >>> [p.name for p in patch_paths("runs/x/patch_a4.0.json")]
    ['patch_a4.0.safetensors', 'patch_a4.0.json']
    """
    p = Path(path)
    stem = p.name[: -len(p.suffix)] if p.suffix in (".safetensors", ".json") else p.name
    if not stem:
        raise ValueError(f"patch path {path!r} has no file name")
    return p.with_name(stem + ".safetensors"), p.with_name(stem + ".json")


def write_patch_file(path: str | Path, selection: NeuronSelection, donor: Weights, target: Weights,
                     header: dict[str, Any]) -> Path:
    """Write both files, each atomically (a reader never sees half of one); return the .safetensors path."""
    from safetensors.torch import save_file

    st, sidecar = patch_paths(path)
    tensors = {"selection": selection.mask.to(torch.uint8)}
    for side, store in (("donor", donor), ("target", target)):
        for layer, roles in store.items():
            for role, t in roles.items():
                tensors[f"{side}.{layer}.{role}"] = t.contiguous().cpu()
    meta = {"cnt_lens": json.dumps(header, default=str)}
    atomic_write(st, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    atomic_write_text(sidecar, json.dumps({**header, "selection": selection.to_json()}, indent=1, default=str))
    return st


def read_patch_file(path: str | Path) -> tuple[dict[str, Any], Tensor, Weights, Weights]:
    """(header, mask, donor, target) of a patch file; :class:`PatchFileError` naming the file otherwise.

    Checks that the file can be read and its format is one this version reads; the caller checks
    the content (shapes, finiteness, hash) by building the patch.
    """
    st, _ = patch_paths(path)
    if not st.is_file():
        raise FileNotFoundError(f"no patch file at {st}")
    header, mask, donor, target = _read_tensors(st)
    if header.get("format") not in READABLE:
        raise PatchFileError(f"{st}: format {header.get('format')!r} is not one this cnt_lens reads "
                             f"({', '.join(READABLE)}); upgrade cnt_lens or re-save the patch")
    return header, mask, donor, target


def _read_tensors(st: Path) -> tuple[dict[str, Any], Tensor, Weights, Weights]:
    from safetensors import safe_open

    try:
        with safe_open(str(st), framework="pt") as f:
            header = json.loads((f.metadata() or {})["cnt_lens"])
            mask = f.get_tensor("selection").bool()
            donor: Weights = {}
            target: Weights = {}
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


def check_sidecar(path: str | Path, header: dict[str, Any], selection: NeuronSelection) -> None:
    """Raise :class:`PatchFileError` if the sidecar beside ``path`` says anything else than the patch (absent: fine).

    ``header`` is the one stored in the .safetensors file; the sidecar must repeat it field for field (alpha,
    architecture, meta, hashes) and hold the same selection, so a hand edit of the sidecar is refused rather
    than silently ignored.
    """
    st, sidecar = patch_paths(path)
    if not sidecar.is_file():
        return
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PatchFileError(f"{sidecar}: damaged sidecar of {st} ({err}); delete it or re-save the patch") from err
    fix = f"the .safetensors file is the patch: re-save it, or delete {sidecar.name}"
    if not isinstance(data, dict) or "selection" not in data:
        raise PatchFileError(f"{sidecar}: no 'selection' field, so it is no sidecar of {st}; {fix}")
    try:
        theirs = NeuronSelection.from_json(data["selection"])
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise PatchFileError(f"{sidecar}: its 'selection' is not a neuron selection ({type(err).__name__}: "
                             f"{err}); {fix}") from None
    differ = sorted(k for k in set(header) | set(data) - {"selection"} if data.get(k) != header.get(k))
    if theirs != selection:
        differ.insert(0, "selection")
    if differ:
        raise PatchFileError(f"{sidecar} does not describe {st}: field(s) {differ} differ (another save, or a hand "
                             f"edit, wrote one of them); {fix}")
