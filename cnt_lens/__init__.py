"""cnt_lens — find the MLP neurons that carry a behaviour in a donor LLM and transplant them, in
weight space, into a target LLM of the same architecture (CNT; NLSR), on TransformerLens 4.

The whole public API is re-exported here::

    import cnt_lens as cl
    pair = cl.load_pair(donor, "smollm2-135m-instruct")
    scores = cl.score(pair, cl.Refusal())
    patch = cl.NeuronPatch.from_pair(pair, scores.top_fraction(0.01), alpha=2.0)
    patch.apply(pair.target); ...; patch.revert(pair.target)
"""

from .behaviours import (
    REFUSAL_MARKERS,
    Behaviour,
    FormatTask,
    Refusal,
    StereotypeBias,
    Utility,
    generate,
    is_refusal,
)
from .data import (
    Batch,
    PromptSet,
    chat_format,
    encode,
    from_advbench_csv,
    from_crows_pairs,
    from_jsonl,
    from_stereoset,
    load_prompts,
)
from .evaluate import Report, measure
from .models import (
    BUNDLED_MODEL,
    IncompatibleModelsError,
    ModelPair,
    architecture,
    bundled_gguf_path,
    check_compatible,
    clone_model,
    load_model,
    load_pair,
    mlp_hidden,
    neuron_params,
    read_neurons,
    write_neurons,
)
from .scoring import METHODS, BehaviourSignalError, score
from .search import SearchResult, iterative_scores, search_minimal
from .selection import NeuronScores, NeuronSelection
from .transplant import NeuronPatch, export_hf

__all__ = [
    "BUNDLED_MODEL", "METHODS", "REFUSAL_MARKERS", "Batch", "Behaviour", "BehaviourSignalError", "FormatTask",
    "IncompatibleModelsError", "ModelPair", "NeuronPatch", "NeuronScores", "NeuronSelection", "PromptSet",
    "Refusal", "Report", "SearchResult", "StereotypeBias", "Utility", "architecture", "bundled_gguf_path",
    "chat_format", "check_compatible", "clone_model", "encode", "export_hf", "from_advbench_csv",
    "from_crows_pairs", "from_jsonl", "from_stereoset", "generate", "is_refusal", "load_model", "load_pair",
    "iterative_scores", "load_prompts", "measure", "mlp_hidden", "neuron_params", "read_neurons", "score", "search_minimal",
    "write_neurons",
]
__version__ = "0.1.0"
