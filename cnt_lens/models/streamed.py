"""A donor read from its checkpoint files one layer at a time: weight-space transfer without loading it.

Weight attribution and :meth:`~cnt_lens.NeuronPatch.from_pair` need the donor's *MLP weights*, not a
donor forward pass. A :class:`StreamedDonor` gives them layer by layer from the donor's safetensors
files (memory-mapped; one tensor read at a time), so a pair needs the target resident plus one donor
layer — for a 70B Llama, 1.4 GB in bf16 instead of the whole donor. It takes the place of a loaded
donor in a :class:`~cnt_lens.ModelPair`::

    target = load_model("my-org/target")
    pair = ModelPair(donor=StreamedDonor("path/to/donor_checkpoint", target=target), target=target)
    scores = score(pair, Refusal(toward=1.0), "weight_attribution")
    patch = NeuronPatch.from_pair(pair, scores.top_k(1000))

What works on a streamed donor: ``weight_attribution`` (the behaviour must say which way the donor
moves the metric, ``toward=``, since the donor is never run), ``weight_diff``, ``nlsr_drift`` and
patches. What needs a donor forward pass — classic (activation) attribution, activation patching,
activation-contrast/Wanda/SNIP on the donor, measuring the donor — raises
:class:`DonorForwardError` naming what to do instead.

Each layer's tensors are read again on every use (one read per layer per scored batch: the donor's
MLP bytes per batch, from the page cache after the first); nothing is kept between uses, which is
what bounds the memory. :attr:`StreamedDonor.peak_bytes` counts the most donor bytes alive at once.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any

import torch

from cnt_lens.core.errors import CntLensError
from cnt_lens.models.forward import Model
from cnt_lens.models.loading import IncompatibleModelsError
from cnt_lens.models.neurons import NeuronParam, activation_of, mlp_of, neuron_params
from cnt_lens.models.pair import architecture

__all__ = ["DonorForwardError", "StreamedDonor"]


class DonorForwardError(CntLensError, TypeError):
    """The step needs the donor's activations, and the donor is streamed (weights only)."""


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file that holds it, from the shard index or the files' headers."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no *.safetensors files: a streamed donor reads a safetensors HF "
                                "checkpoint (save one with export_hf or save_pretrained(safe_serialization=True))")
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            where.update({name: file for name in f.keys()})
    return where


def _layer_names(target: Model) -> list[list[tuple[str, str, int]]]:
    """Per layer, ``(role, HF tensor name, neuron axis)`` of every neuron tensor of ``target``'s MLP."""
    out = [[(p.role, p.name, p.axis) for p in neuron_params(target, layer)] for layer in range(int(target.cfg.n_layers))]
    fused = sorted({role for layer in out for role, name, _ in layer if not name})
    if fused:
        raise NotImplementedError(
            f"streamed donor: the target's {', '.join(fused)} are views of a fused tensor ({architecture(target)}), "
            "which a streamed donor cannot read one role at a time; load the donor whole with load_model")
    return out


class StreamedDonor:
    """The donor of a pair as checkpoint files: its MLP neuron tensors, read one layer at a time.

    Args:
        path: an HF checkpoint directory with ``*.safetensors`` (one file, or shards with their
            ``model.safetensors.index.json``) of a model with the target's architecture.
        target: the loaded target; it fixes the tensor names, layouts, dtype and device the donor's
            tensors are read into, and the shapes they are checked against on construction.

    Raises :class:`~cnt_lens.IncompatibleModelsError` naming every missing or mis-shaped tensor.
    """

    def __init__(self, path: str | Path, *, target: Model) -> None:
        from safetensors import safe_open

        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise FileNotFoundError(f"streamed donor: {self.path} is not a checkpoint directory")
        self._files = _tensor_files(self.path)
        self._names = _layer_names(target)
        self._like = [neuron_params(target, layer) for layer in range(len(self._names))]
        self._acts = [activation_of(mlp_of(target, layer)) for layer in range(len(self._names))]
        self._architecture = architecture(target)
        self.cnt_source = f"{self.path} (streamed)"
        self.resident_bytes = 0
        self.peak_bytes = 0
        problems = []
        for layer, names in enumerate(self._names):
            for (role, name, _), like in zip(names, self._like[layer]):
                if name not in self._files:
                    problems.append(f"{name} ({role} of layer {layer}) is in no file of {self.path}")
                    continue
                with safe_open(str(self._files[name]), framework="pt") as f:
                    shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(like.tensor.shape):
                    problems.append(f"{name}: donor {shape}, target {tuple(like.tensor.shape)}")
        if problems:
            raise IncompatibleModelsError("streamed donor does not fit the target: " + "; ".join(problems[:8]))

    def architecture(self) -> dict[str, Any]:
        """The target's architecture facts, which every donor tensor was checked against on construction."""
        return dict(self._architecture)

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self._names)

    def layer_params(self, layer: int) -> list[NeuronParam]:
        """``layer``'s neuron tensors read from disk, in the target's dtype, device, roles and layout."""
        from safetensors import safe_open

        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range for a donor with {self.n_layers} layers")
        entries = list(zip(self._names[layer], self._like[layer]))
        read: dict[str, torch.Tensor] = {}
        for file in {self._files[name] for (_, name, _), _ in entries}:  # a layer's tensors share a shard: one open
            with safe_open(str(file), framework="pt") as f:
                for (_, name, _), like in entries:
                    if self._files[name] == file:
                        read[name] = f.get_tensor(name).to(device=like.tensor.device, dtype=like.tensor.dtype)
        for t in read.values():
            self._count(t)
        return [NeuronParam(role, read[name], axis, name) for (role, name, axis), _ in entries]

    def mlp_terms(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(donor MLP activations ``[..., d_mlp]`` for the MLP input ``x``, donor ``W_out`` ``[d_mlp, d_model]``).

        One read of the layer serves both: what weight attribution needs of the donor at that layer.
        """
        params = {p.role: p for p in self.layer_params(layer)}

        def project(role: str) -> torch.Tensor:
            p = params[role]
            h = x @ p.tensor.movedim(p.axis, 0).T.to(x.dtype)
            bias = params.get("b" + role[1:])
            return h if bias is None else h + bias.tensor.to(x.dtype)

        up = project("W_in")
        hidden = self._acts[layer](project("W_gate")) * up if "W_gate" in params else self._acts[layer](up)
        out = params["W_out"]
        return hidden, out.tensor.movedim(out.axis, 0)

    def _count(self, t: torch.Tensor) -> None:
        """Track the donor bytes alive (released when the tensor is garbage-collected)."""
        size = t.numel() * t.element_size()
        self.resident_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes)
        weakref.finalize(t, self._release, size)

    def _release(self, size: int) -> None:
        self.resident_bytes -= size

    def __getattr__(self, name: str) -> Any:
        # Anything a loaded model offers that a weights-only donor does not (forward, run_with_hooks, cfg, to …)
        if name.startswith("__") or name in ("path", "_files", "_names", "_like", "_acts", "_architecture"):
            raise AttributeError(name)
        raise DonorForwardError(
            f"this step needs the donor as a loaded model (it asked for .{name}); the donor is streamed from "
            f"{self.path}, weights only. Use weight_attribution, weight_diff or nlsr_drift and NeuronPatch.from_pair "
            "with a streamed donor, or load it with load_model(...) for activation-based scorers and evaluation."
        )
