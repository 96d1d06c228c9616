"""The plain HuggingFace model under a bridge.

Its state dict, a hook-free view that shares the bridge's weights (for KV-cached generation), and
an independent copy of a whole model.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from cnt_lens.models.forward import Model, model_tokenizer
from cnt_lens.models.loading import load_model
from cnt_lens.models.neurons import clean_key, plain_keys, resident

__all__ = ["clone_model", "fresh_hf_model", "plain_hf_model", "hf_state_dict"]


def hf_state_dict(model: Model) -> dict[str, Tensor]:
    """The wrapped HF model's weights under their plain HF names (bridge wrappers and aliases removed).

    These are the tensors the bridge runs on (no copies), keyed as a freshly built model of the
    same class and config expects them, e.g. for ``save_pretrained`` or a clean clone.
    """
    clean: dict[str, Tensor] = {}
    for key, value in model.original_model.state_dict().items():
        clean.setdefault(key.replace("._original_component", ""), value)
    expected = plain_keys(model)
    missing = [k for k in expected if k not in clean]
    if missing:
        raise RuntimeError(f"cannot map bridge weights back to HF names; missing {missing[:5]}")
    return {k: clean[k] for k in expected}


def plain_hf_model(model: Model) -> torch.nn.Module:
    """A plain HF model (no bridge wrappers) that runs on ``model``'s very weight tensors, zero-copy.

    Built on the meta device, then every parameter and buffer is bound to the bridge's tensor of the
    same HF name, so an in-place weight write (a transplant, a fine-tune step) is seen by both. Use it
    for what the bridge's wrappers should not be trusted with: KV-cached ``generate`` (transformers
    5.24 emits one token and then ``-`` forever through bridge-wrapped modules; README, "Generation").
    A bias that an edit attached to a bias-free linear layer of the bridge (activation addition,
    :func:`~cnt_lens.method.directions.added`) is bound too.
    """
    hf = model.original_model
    with torch.device("meta"):
        plain = type(hf)(copy.deepcopy(hf.config))
    plain.load_state_dict(hf_state_dict(model), assign=True, strict=True)
    # non-persistent buffers (rotary inv_freq, causal masks) are in no state dict: bind the bridge's own
    buffers = {clean_key(k): v for k, v in hf.named_buffers()}
    for name, buf in list(plain.named_buffers()):
        if name in buffers:
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner)._buffers[leaf] = buffers[name]
    plain.tie_weights()
    _bind_added_biases(hf, plain)
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


def _bind_added_biases(hf: torch.nn.Module, plain: torch.nn.Module) -> None:
    """Give ``plain`` each bias that ``hf``'s linear layers hold where its config builds none (the same tensor)."""
    for name, module in hf.named_modules():
        if isinstance(module, torch.nn.Linear) and isinstance(module.bias, torch.nn.Parameter):
            try:  # the bridge's own split layers (GPT-2's q, k, v) have no plain twin
                twin = plain.get_submodule(clean_key(name))
            except AttributeError:
                continue
            if isinstance(twin, torch.nn.Linear) and twin.bias is None:
                twin.bias = module.bias


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
        add_hook_to_module(plain.get_submodule(clean_key(name)), copy.copy(hook))
        if any(getattr(h, "offload", False) for h in getattr(hook, "hooks", [hook])):
            offloaded.add(clean_key(name))
    return offloaded


def fresh_hf_model(model: Model) -> torch.nn.Module:
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
                            value = resident(module, leaf, name, pin=False) if t.is_meta else t
                            copies[id(t)] = value.detach().clone()
                        c = copies[id(t)]
                        store[leaf] = torch.nn.Parameter(c, requires_grad=False) if isinstance(t, torch.nn.Parameter) else c
    if hasattr(model.original_model, "hf_device_map"):
        from accelerate.hooks import remove_hook_from_submodules

        remove_hook_from_submodules(fresh)
    fresh.tie_weights()
    return fresh


def clone_model(model: Model) -> TransformerBridge:
    """An independent copy of ``model`` (fresh HF modules, weights copied, same tokenizer); no reload."""
    clone = load_model(fresh_hf_model(model), tokenizer=model_tokenizer(model))
    object.__setattr__(clone, "cnt_source", f"clone of {getattr(model, 'cnt_source', '?')}")
    return clone


# --------------------------------------------------------------------------- pairs
