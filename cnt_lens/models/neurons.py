"""Hooked models: load donor and target as bridges, check a pair, read and write neurons.

Loads donor and target as TransformerLens bridges, checks that a pair fits, and reads or writes
the weights of individual MLP neurons.

Transplants work on the **raw** (unfolded) HuggingFace weights that the bridge wraps, never on
``enable_compatibility_mode()``'s LayerNorm-folded copies. Folding multiplies each neuron's input
weights by the model's own LayerNorm scale, which differs between donor and target, so a folded
column copied across models is not the donor's neuron any more; raw weights also export to a
standard HF checkpoint unchanged. The bridge's forward runs the HF modules, so a write through
:func:`write_neurons` changes the very next forward pass.

A *neuron* ``i`` of layer ``l`` owns: column ``i`` of ``W_gate`` (gated MLPs) and ``W_in``, entry
``i`` of ``b_in`` (when the MLP has biases) and row ``i`` of ``W_out`` (TransformerLens
orientation). ``b_out`` is shared by all neurons of a layer and is never transplanted.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, NamedTuple, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from cnt_lens.core.errors import CntLensError
from cnt_lens.models.forward import Model

__all__ = ["DonorWeights", "NeuronParam", "OffloadedWeightsError", "TESTED_FAMILIES", "UnsupportedModelError", "mlp_hidden", "neuron_params", "read_neurons", "write_neurons"]

log = logging.getLogger(__name__)


def check_dense_mlp(bridge: TransformerBridge) -> None:
    """Refuse mixture-of-experts MLPs; take ``cfg.d_mlp`` from the weights where the bridge's config guessed it.

    Some adapters (OPT, Falcon) fill ``d_mlp`` from a config field their family does not use and get
    ``4 * d_model``; the MLP's output projection holds the true width.
    """
    mlp = bridge.blocks[0].mlp
    children = {n for n, _ in mlp.named_children()} | {n for n, _ in mlp.original_component.named_children()}
    if children & {"experts", "router", "shared_expert"} or "blocks.0.mlp.hook_router_scores" in bridge.hook_dict:
        raise UnsupportedModelError(
            f"{type(mlp.original_component).__name__} is a mixture-of-experts MLP: cnt_lens transplants neurons of "
            f"dense MLPs (tested: {', '.join(TESTED_FAMILIES)})")
    out = projection_of(mlp, "out")
    if out is None:
        raise UnsupportedModelError(f"{type(mlp.original_component).__name__} has no output projection the bridge names "
                                    f"'out'; cnt_lens supports dense MLPs (tested: {', '.join(TESTED_FAMILIES)})")
    width = int(out.weight.shape[1] if isinstance(out, torch.nn.Linear) else out.weight.shape[0])
    if width != int(bridge.cfg.d_mlp):
        log.info("%s: cfg.d_mlp %d → %d (read from the MLP's output projection)",
                 type(bridge.original_model).__name__, bridge.cfg.d_mlp, width)
        bridge.cfg.d_mlp = width


def plain_keys(model: Model) -> tuple[str, ...]:
    """The state-dict keys of a freshly built HF model of ``model``'s class and config (cached per model)."""
    if "_cnt_lens_plain_keys" not in model.__dict__:
        hf = model.original_model
        with torch.device("meta"):
            model.__dict__["_cnt_lens_plain_keys"] = tuple(type(hf)(copy.deepcopy(hf.config)).state_dict())
    return model.__dict__["_cnt_lens_plain_keys"]


def clean_key(name: str) -> str:
    return name.replace("._original_component", "")


@runtime_checkable
class DonorWeights(Protocol):
    """A weights-only donor: its MLP neuron tensors layer by layer, no forward pass.

    :class:`~cnt_lens.models.streamed.StreamedDonor` (read from checkpoint files) is the one cnt_lens ships;
    anything with these three methods can stand in for a loaded donor in weight-space steps.
    """

    def layer_params(self, layer: int) -> list["NeuronParam"]:
        """``layer``'s neuron tensors with the target's roles, layouts, dtype and device."""

    def mlp_terms(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """(MLP activations ``[..., d_mlp]`` for the MLP input ``x``, ``W_out`` ``[d_mlp, d_model]``)."""

    def architecture(self) -> dict[str, Any]:
        """The shape facts :func:`check_compatible` compares."""


# --------------------------------------------------------------------------- neuron weights


TESTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox",
                   "opt", "stablelm", "olmo", "falcon")
r"""HF ``model_type``\ s whose neuron mapping, patching, export and generation the test suite checks on tiny models
(``tests/test_architectures.py``). Other dense families the bridge loads usually work too; mixture-of-experts MLPs
are refused (their neurons belong to experts that a token may not visit)."""


class UnsupportedModelError(CntLensError, ValueError):
    """A model cnt_lens cannot hook or transplant: an architecture the bridge does not know, or a mixture-of-experts MLP."""


class OffloadedWeightsError(CntLensError, RuntimeError):
    """A layer's MLP weights are on the ``meta`` device with no accelerate offload store to read or write them."""


class NeuronParam(NamedTuple):
    """One tensor holding part of every neuron of a layer; ``axis`` indexes the neurons."""

    role: str  # "W_gate" | "W_in" | "b_in" | "W_out"
    tensor: Tensor
    axis: int
    name: str = ""  # plain HF state-dict name ("model.layers.3.mlp.up_proj.weight"); "" for a view of a fused tensor


def mlp_of(model: Model, layer: int) -> Any:
    if not 0 <= layer < model.cfg.n_layers:
        raise IndexError(f"layer {layer} out of range for a model with {model.cfg.n_layers} layers")
    return model.blocks[layer].mlp


def projection_of(mlp: Any, name: str) -> torch.nn.Module | None:
    sub = getattr(mlp, name, None)
    return None if sub is None else sub.original_component


def neuron_params(model: Model | DonorWeights, layer: int) -> list[NeuronParam]:
    """The raw HF tensors of ``layer``'s MLP that belong to individual neurons.

    For a :class:`~cnt_lens.models.streamed.StreamedDonor`, the same tensors read from its files (copies).

    Handles ``nn.Linear`` (weight ``[out, in]``: Llama, Mistral, Qwen…) and GPT-2's ``Conv1D``
    (weight ``[in, out]``). The neuron axis is found from the module type and checked against d_mlp.
    The lookup is cached per model (the parameters are the same objects for the model's lifetime).
    """
    if is_streamed(model):
        return model.layer_params(layer)
    cache = model.__dict__.setdefault("_cnt_lens_params", {})
    if layer not in cache:
        cache[layer] = _find_neuron_params(model, layer)
    return cache[layer]


def _find_neuron_params(model: Model, layer: int) -> list[NeuronParam]:
    mlp = mlp_of(model, layer)
    d_mlp = int(model.cfg.d_mlp)
    if "_cnt_lens_module_names" not in model.__dict__:  # once per model, not once per layer
        model.__dict__["_cnt_lens_module_names"] = ({id(m): clean_key(n) for n, m in model.original_model.named_modules()},
                                                   frozenset(plain_keys(model)))
    names, keys = model.__dict__["_cnt_lens_module_names"]
    _named = lambda name: name if name in keys else ""  # noqa: E731  (phi3's halves of gate_up_proj: views, no key)
    out: list[NeuronParam] = []
    for name, role, is_input in (("gate", "W_gate", True), ("in", "W_in", True), ("out", "W_out", False)):
        proj = projection_of(mlp, name)
        if proj is None:
            if name == "gate":
                continue
            raise NotImplementedError(f"layer {layer}'s MLP has no '{name}' projection; unsupported MLP")
        linear_layout = isinstance(proj, torch.nn.Linear)  # weight [out_features, in_features]
        axis = (0 if linear_layout else 1) if is_input else (1 if linear_layout else 0)
        weight = resident(proj, "weight", f"layer {layer}'s MLP")
        if weight.shape[axis] != d_mlp:
            raise NotImplementedError(f"unexpected {role} shape {tuple(weight.shape)} in layer {layer}")
        out.append(NeuronParam(role, weight, axis, _named(f"{names[id(proj)]}.weight")))
        if is_input and getattr(proj, "bias", None) is not None:
            out.append(NeuronParam("b" + role[1:], resident(proj, "bias", f"layer {layer}'s MLP"), 0,
                                   _named(f"{names[id(proj)]}.bias")))
    return out


def resident(module: torch.nn.Module, name: str, where: str, *, pin: bool = True) -> Tensor:
    """``module``'s tensor ``name``, or, when accelerate offloads it, the stored tensor it is loaded from.

    An offloaded module's parameters are on the ``meta`` device between forward passes; accelerate's hook
    reads each one from its ``weights_map`` before every forward. Tensors kept in host memory (``"cpu"``
    offload) are returned as they are, so an in-place write is what the next forward loads. Tensors read
    from disk are read once and kept in the store's host-memory ``state_dict``, which accelerate reads
    before the files: the layer's MLP then costs host memory (never device memory), and the files are
    never written. With ``pin=False`` a tensor read from disk is returned without being kept (a read,
    not a place to write). ``where`` names the module in the error.
    """
    tensor = getattr(module, name)
    if not tensor.is_meta:
        return tensor
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):
        weights = getattr(h, "weights_map", None)
        if getattr(h, "offload", False) and weights is not None:
            store, key = getattr(weights, "dataset", weights), getattr(weights, "prefix", "") + name
            pinned = getattr(store, "state_dict", store)
            if isinstance(pinned, dict):
                if key in pinned or not pin:
                    return pinned.get(key, store[key])
                pinned[key] = store[key].clone()
                return pinned[key]
    raise OffloadedWeightsError(
        f"{where} tensor {name!r} is on the meta device and no accelerate offload store holds it, "
        "so it cannot be read or patched. Load the model with load_model(..., device_map=...) (accelerate then "
        "keeps offloaded weights in a store cnt_lens can write), or keep every MLP on a device.")


def read_neurons(model: Model | DonorWeights, layer: int, idx: Int[Tensor, " n"]) -> dict[str, Tensor]:
    """Copies of the given neurons' weights, neuron axis first: ``W_in`` → ``[n, d_model]``, etc."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    return {
        p.role: p.tensor.detach().index_select(p.axis, idx.to(p.tensor.device)).movedim(p.axis, 0).clone()
        for p in neuron_params(model, layer)
    }


def write_neurons(model: Model, layer: int, idx: Int[Tensor, " n"], values: dict[str, Tensor]) -> None:
    """Write ``values`` (as returned by :func:`read_neurons`) into the given neurons, in place."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    params = neuron_params(model, layer)
    missing = {p.role for p in params} - set(values)
    if missing:
        raise KeyError(f"values lack {sorted(missing)} for layer {layer}")
    with torch.no_grad():
        for p in params:
            v = values[p.role].to(device=p.tensor.device, dtype=p.tensor.dtype).movedim(0, p.axis)
            p.tensor.index_copy_(p.axis, idx.to(p.tensor.device), v)


def activation_of(mlp: Any) -> Callable[[Tensor], Tensor]:
    hf = mlp.original_component
    for attr in ("act_fn", "act", "activation_fn", "activation"):
        fn = getattr(hf, attr, None)
        if callable(fn):
            return fn
    raise NotImplementedError(f"cannot find the activation function of {type(hf).__name__}")


def mlp_hidden(model: Model | DonorWeights, layer: int, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_mlp"]:
    """``model``'s layer-``layer`` MLP activations (``hook_post``) for the MLP input ``x``.

    ``x`` is what enters the MLP (``blocks.{l}.mlp.hook_in``, i.e. after the pre-MLP norm). Calling
    it with the *donor* on the *target's* input gives the activations the transplanted neurons will
    have inside the target, which is what weight-space attribution needs.
    """
    if is_streamed(model):
        return model.mlp_terms(layer, x)[0]
    mlp = mlp_of(model, layer)
    act = activation_of(mlp)
    up = projection_of(mlp, "in")(x)
    gate = projection_of(mlp, "gate")
    return act(gate(x)) * up if gate is not None else act(up)


def w_out(model: Model | DonorWeights, layer: int) -> Float[Tensor, "d_mlp d_model"]:
    """``W_out`` of ``layer`` in TransformerLens orientation (a view, never a copy; read from disk when streamed)."""
    if is_streamed(model):
        out = next(p for p in model.layer_params(layer) if p.role == "W_out")
        return out.tensor.movedim(out.axis, 0)
    return model.blocks[layer].mlp.W_out


def is_streamed(model: Model | DonorWeights) -> bool:
    """Whether ``model`` is a weights-only donor (:class:`DonorWeights`) rather than a loaded model."""
    return not isinstance(model, TransformerBridge) and isinstance(model, DonorWeights)
