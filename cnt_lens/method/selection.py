"""Neuron scores and neuron selections: ``[n_layers, d_mlp]`` tensors with their provenance.

``NeuronScores.values[l, i]`` is higher when transplanting neuron ``i`` of layer ``l`` moves the
target further toward the donor's behaviour. NaN marks a neuron a method did not score (e.g.
exact patching restricted to candidates); NaN sorts below every number.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from cnt_lens.core.files import atomic_write, atomic_write_text

__all__ = ["HOOK_MODES", "NeuronScores", "NeuronSelection", "hook_name"]

HOOK_MODES = ("zero", "mean", "scale", "patch")
"""What :meth:`NeuronSelection.hooks` does to the selected neurons' activations."""


def hook_name(layer: int, hook: str) -> str:
    """``blocks.{layer}.mlp.{hook}``: the MLP hook names this library uses (hook_in/post/out)."""
    return f"blocks.{layer}.mlp.{hook}"


@dataclass
class NeuronScores:
    """Per-neuron scores plus how they were made (method, behaviour, prompt count, settings)."""

    values: Float[Tensor, "n_layers d_mlp"]
    method: str
    behaviour: str = ""
    n_prompts: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.values.dim() != 2:
            raise ValueError(f"scores must be [n_layers, d_mlp], got shape {tuple(self.values.shape)}")
        self.values = self.values.detach().float().cpu()

    @property
    def shape(self) -> tuple[int, int]:
        """(n_layers, d_mlp)."""
        return tuple(self.values.shape)  # type: ignore[return-value]

    def ranked(self) -> Float[Tensor, "n_layers d_mlp"]:
        """Values with NaN replaced by -inf, for sorting."""
        return torch.nan_to_num(self.values, nan=float("-inf"))

    def top_k(self, k: int, *, per_layer: bool = False, absolute: bool = False) -> "NeuronSelection":
        """The ``k`` highest-scoring neurons overall, or ``k`` per layer with ``per_layer=True``.

        ``absolute=True`` ranks by magnitude (for importance baselines whose sign means nothing).
        """
        v = self.values.abs() if absolute else self.values
        v = torch.nan_to_num(v, nan=float("-inf"))
        n_layers, d_mlp = v.shape
        mask = torch.zeros_like(v, dtype=torch.bool)
        if per_layer:
            k = min(k, d_mlp)
            mask.scatter_(1, v.topk(k, dim=1).indices, True)
        else:
            k = min(k, v.numel())
            mask.view(-1)[v.flatten().topk(k).indices] = True
        return NeuronSelection(mask, source=f"top{'-per-layer' if per_layer else ''} {k} by {self.method}")

    def top_fraction(self, fraction: float, **kwargs: Any) -> "NeuronSelection":
        """Top ``fraction`` (0–1) of all neurons."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        return self.top_k(max(1, round(fraction * self.values.numel())), **kwargs)

    def above(self, threshold: float) -> "NeuronSelection":
        """The neurons scoring above ``threshold`` (NaN never does)."""
        return NeuronSelection(torch.nan_to_num(self.values, nan=float("-inf")) > threshold,
                               source=f"{self.method} > {threshold}")

    def rank_of(self, selection: "NeuronSelection") -> Tensor:
        """1-based global ranks (by value, descending) of the selected neurons, in layer-major order."""
        order = self.ranked().flatten().argsort(descending=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(1, order.numel() + 1)
        return ranks[selection.mask.flatten()]

    def __repr__(self) -> str:
        s = self.summary()
        rng = f", range [{s['min']:.3g}, {s['max']:.3g}]" if s["max"] is not None else ""
        return (f"NeuronScores({self.method!r}, behaviour={self.behaviour!r}, shape={self.shape}, "
                f"n_prompts={self.n_prompts}, scored={s['n_scored']}{rng})")

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary: method, behaviour, prompts and the scores' range."""
        finite = self.values[self.values.isfinite()]
        return {"method": self.method, "behaviour": self.behaviour, "n_prompts": self.n_prompts,
                "n_scored": int(finite.numel()),
                "max": float(finite.max()) if finite.numel() else None,
                "min": float(finite.min()) if finite.numel() else None, **self.meta}

    def save(self, path: str | Path) -> None:
        """Write the scores as safetensors (values + a JSON header), atomically."""
        from safetensors.torch import save_file

        header = json.dumps({"method": self.method, "behaviour": self.behaviour, "n_prompts": self.n_prompts,
                             "meta": self.meta}, default=str)
        atomic_write(path, lambda tmp: save_file({"values": self.values.contiguous()}, str(tmp),
                                                 metadata={"cnt_lens": header}))

    @classmethod
    def load(cls, path: str | Path) -> "NeuronScores":
        """Read scores written by :meth:`save`; a damaged or foreign file raises ``ValueError`` naming it."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                info = json.loads((f.metadata() or {})["cnt_lens"])
                return cls(f.get_tensor("values"), info["method"], info["behaviour"], info["n_prompts"], info["meta"])
        except FileNotFoundError:
            raise
        except Exception as err:
            raise ValueError(f"{path}: not a readable cnt_lens scores file ({type(err).__name__}: {err})") from err


@dataclass
class NeuronSelection:
    """A boolean ``[n_layers, d_mlp]`` mask of neurons, with set operations and per-layer views."""

    mask: Bool[Tensor, "n_layers d_mlp"]
    source: str = ""

    def __post_init__(self) -> None:
        self.mask = torch.as_tensor(self.mask).bool().cpu()
        if self.mask.dim() != 2:
            raise ValueError(f"a selection mask must be [n_layers, d_mlp], got {tuple(self.mask.shape)}")

    @classmethod
    def empty(cls, n_layers: int, d_mlp: int) -> "NeuronSelection":
        """A selection of no neurons."""
        return cls(torch.zeros(n_layers, d_mlp, dtype=torch.bool), source="empty")

    @classmethod
    def from_indices(cls, pairs: Iterable[Sequence[int]], n_layers: int, d_mlp: int) -> "NeuronSelection":
        """From ``(layer, neuron)`` pairs (tuples, or two-item lists as JSON gives them)."""
        mask = torch.zeros(n_layers, d_mlp, dtype=torch.bool)
        for layer, neuron in pairs:
            if not (0 <= layer < n_layers and 0 <= neuron < d_mlp):
                raise IndexError(f"neuron ({layer}, {neuron}) outside a [{n_layers}, {d_mlp}] model")
            mask[layer, neuron] = True
        return cls(mask, source="explicit")

    @property
    def shape(self) -> tuple[int, int]:
        """(n_layers, d_mlp)."""
        return tuple(self.mask.shape)  # type: ignore[return-value]

    @property
    def n(self) -> int:
        """Number of selected neurons."""
        return int(self.mask.sum())

    @property
    def fraction(self) -> float:
        """Selected share of all neurons."""
        return self.n / self.mask.numel()

    def __len__(self) -> int:
        return self.n

    def indices(self) -> list[tuple[int, int]]:
        """Selected ``(layer, neuron)`` pairs in layer-major order."""
        return [tuple(x) for x in self.mask.nonzero().tolist()]  # type: ignore[misc]

    def layer_indices(self, layer: int) -> Tensor:
        """Selected neuron indices of ``layer``, ascending (int64, ``[k]``)."""
        return self.mask[layer].nonzero().squeeze(-1)

    def per_layer(self) -> list[int]:
        """Selected neurons per layer."""
        return self.mask.sum(1).tolist()

    def _check(self, other: "NeuronSelection") -> None:
        if self.shape != other.shape:
            raise ValueError(f"selections of different shapes {self.shape} and {other.shape}")

    def __or__(self, other: "NeuronSelection") -> "NeuronSelection":
        self._check(other)
        return NeuronSelection(self.mask | other.mask, source=f"({self.source}) ∪ ({other.source})")

    def __and__(self, other: "NeuronSelection") -> "NeuronSelection":
        self._check(other)
        return NeuronSelection(self.mask & other.mask, source=f"({self.source}) ∩ ({other.source})")

    def __sub__(self, other: "NeuronSelection") -> "NeuronSelection":
        self._check(other)
        return NeuronSelection(self.mask & ~other.mask, source=f"({self.source}) − ({other.source})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NeuronSelection) and self.shape == other.shape and bool((self.mask == other.mask).all())

    def overlap(self, other: "NeuronSelection") -> float:
        """|self ∩ other| / |self| (0 for an empty self)."""
        return (self & other).n / self.n if self.n else 0.0

    def hooks(self, mode: str = "zero", *, values: Any = None, factor: float = 0.0,
              hook: str = "hook_post") -> list[tuple[str, Callable[..., Tensor]]]:
        """TransformerLens ``fwd_hooks`` that edit the selected neurons in activation space, not in weights.

        ``mode``: ``"zero"`` ablates them; ``"mean"`` sets them to ``values``, a ``[n_layers, d_mlp]`` tensor
        (e.g. their mean activation over a prompt set); ``"scale"`` multiplies them by ``factor``;
        ``"patch"`` writes another run's activations, ``values`` being an ``ActivationCache`` (or a dict of
        hook name → ``[batch, pos, d_mlp]``) of the donor on the same tokens. Unselected neurons pass
        through. Use with ``model.run_with_hooks(tokens, fwd_hooks=selection.hooks(...))`` or ``model.hooks``.

        >>> sel = NeuronSelection.from_indices([(1, 2)], n_layers=2, d_mlp=4)
        >>> [(name, f(torch.ones(1, 1, 4), None).tolist()) for name, f in sel.hooks("scale", factor=3.0)]
        [('blocks.1.mlp.hook_post', [[[1.0, 1.0, 3.0, 1.0]]])]
        """
        if mode not in HOOK_MODES:
            raise ValueError(f"mode must be one of {HOOK_MODES}, got {mode!r}")
        if mode in ("mean", "patch") and values is None:
            raise ValueError(f"mode {mode!r} needs values= (mean: a [n_layers, d_mlp] tensor; patch: the donor's "
                             "ActivationCache on the same tokens)")
        if mode == "mean" and tuple(values.shape) != self.shape:
            raise ValueError(f"mean values are {tuple(values.shape)}, the selection {self.shape}")
        out = []
        for layer in self.mask.any(-1).nonzero().flatten().tolist():
            idx = self.layer_indices(layer)
            out.append((hook_name(layer, hook), functools.partial(_edit, idx=idx, mode=mode, factor=factor,
                                                                  source=_layer_values(values, mode, layer, hook))))
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON form: shape, source and ``[layer, neuron]`` pairs."""
        return {"shape": list(self.shape), "source": self.source, "neurons": self.indices()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "NeuronSelection":
        """Inverse of :meth:`to_json`."""
        sel = cls.from_indices(data["neurons"], *data["shape"])
        sel.source = data.get("source", "")
        return sel

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path`` atomically."""
        atomic_write_text(path, json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> "NeuronSelection":
        """Read a selection written by :meth:`save`."""
        return cls.from_json(json.loads(Path(path).read_text()))

    def __repr__(self) -> str:
        return f"NeuronSelection(n={self.n}, shape={self.shape}, source={self.source!r})"


def _layer_values(values: Any, mode: str, layer: int, hook: str) -> Any:
    """What :func:`_edit` writes at ``layer``: a ``[d_mlp]`` row (mean), a cached activation (patch), or nothing."""
    if mode == "mean":
        return torch.as_tensor(values)[layer]
    if mode == "patch":
        return values[hook_name(layer, hook)]
    return None


def _edit(x: Float[Tensor, "batch pos d_mlp"], hook: Any, *, idx: Tensor, mode: str, factor: float,
          source: Any) -> Float[Tensor, "batch pos d_mlp"]:
    """One hook of :meth:`NeuronSelection.hooks`: a copy of ``x`` with the neurons ``idx`` edited."""
    x = x.clone()
    i = idx.to(x.device)
    if mode == "zero":
        x[..., i] = 0.0
    elif mode == "scale":
        x[..., i] = x[..., i] * factor
    elif mode == "mean":
        x[..., i] = source.to(x.device, x.dtype)[i]
    else:
        if tuple(source.shape) != tuple(x.shape):
            raise ValueError(f"patch source is {tuple(source.shape)}, this run's activations {tuple(x.shape)}: "
                             "cache the donor on the same tokens")
        x[..., i] = source.to(x.device, x.dtype)[..., i]
    return x
