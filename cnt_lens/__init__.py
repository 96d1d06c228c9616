"""cnt_lens: move a behaviour between LLMs by transplanting the MLP neurons that carry it.

Finds the neurons that carry a behaviour in a donor LLM and transplants them, in weight space, into
a target LLM of the same architecture (CNT; NLSR), on TransformerLens 4.

The whole public API is re-exported here::

    import cnt_lens as cl
    pair = cl.load_pair(donor, "smollm2-135m-instruct")
    scores = cl.score(pair, cl.Refusal())
    patch = cl.NeuronPatch.from_pair(pair, scores.top_fraction(0.01), alpha=2.0)
    with patch.applied(pair.target):   # temporary; patch.apply(...) is the permanent edit
        ...
"""

from .behaviours import (
    Behaviour,
    FormatTask,
    GenerationError,
    Refusal,
    StereotypeBias,
    Utility,
    canary,
    donor_refusal,
    generate,
    verify_greedy,
)
from .data import (
    Batch,
    PromptSet,
    SharedPrefix,
    chat_format,
    cross_distribution,
    cross_harmful,
    cross_harmless,
    default_harmful,
    default_harmless,
    encode,
    load_prompts,
    split_shared_prefix,
    stable_split,
)
from .evaluate import Report, gap_shares, measure, wilson_interval
from .formats import (
    FORMATS,
    PromptFileError,
    describe_file,
    detect_format,
    from_advbench_csv,
    from_crows_pairs,
    from_jsonl,
    from_stereoset,
    load_file,
    register_format,
)
from .judge import REFUSAL_OPENINGS, Verdict, is_refusal, judge_accuracy, judge_refusal, verdict_is_final
from .models import (
    BUNDLED_MODEL,
    TESTED_FAMILIES,
    DonorWeights,
    IncompatibleModelsError,
    ModelPair,
    OffloadedWeightsError,
    UnsupportedModelError,
    architecture,
    bundled_gguf_path,
    check_compatible,
    clone_model,
    context_length,
    load_model,
    load_pair,
    logits_of,
    mlp_hidden,
    neuron_params,
    plain_hf_model,
    read_neurons,
    write_neurons,
)
from .offline import OFFLINE_MODELS, offline_path
from .resume import code_digest, resumable, weights_digest
from .scoring import METHODS, BehaviourSignalError, score
from .search import NoGapError, SearchResult, iterative_scores, measure_reference, search_minimal
from .selection import NeuronScores, NeuronSelection
from .streamed import DonorForwardError, StreamedDonor
from .timing import Profile, profile, stage, timings_table
from .transplant import NeuronPatch, PatchFileError, applied_patches, export_hf

__all__ = [
    "BUNDLED_MODEL", "DonorForwardError", "DonorWeights", "FORMATS", "METHODS", "OFFLINE_MODELS", "REFUSAL_OPENINGS", "Batch", "Behaviour", "BehaviourSignalError", "FormatTask",
    "GenerationError", "IncompatibleModelsError", "ModelPair", "NeuronPatch", "NeuronScores", "NeuronSelection",
    "NoGapError", "OffloadedWeightsError", "PatchFileError", "Profile", "PromptFileError", "PromptSet", "Refusal", "Report", "SearchResult", "SharedPrefix", "StereotypeBias", "StreamedDonor", "TESTED_FAMILIES",
    "UnsupportedModelError", "Utility", "Verdict", "applied_patches", "architecture", "bundled_gguf_path", "canary", "chat_format", "check_compatible", "code_digest", "cross_distribution", "cross_harmful", "cross_harmless", "clone_model", "default_harmful", "default_harmless", "gap_shares",
    "context_length", "describe_file", "donor_refusal", "detect_format", "encode", "export_hf", "from_advbench_csv", "from_crows_pairs", "from_jsonl", "from_stereoset",
    "generate", "is_refusal", "iterative_scores", "judge_accuracy", "judge_refusal", "load_model", "load_pair", "logits_of",
    "load_file", "load_prompts", "measure", "measure_reference", "mlp_hidden", "neuron_params", "offline_path", "plain_hf_model", "profile", "read_neurons",
    "register_format", "resumable", "score", "search_minimal", "split_shared_prefix", "stable_split", "stage", "timings_table", "verdict_is_final", "verify_greedy", "weights_digest", "wilson_interval",
    "write_neurons",
]
__version__ = "0.1.0"
