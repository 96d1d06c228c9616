"""cnt_lens: move a behaviour between LLMs by transplanting the MLP neurons that carry it.

Finds the neurons that carry a behaviour in a donor LLM and transplants them, in weight space, into
a target LLM of the same architecture (CNT; NLSR), on TransformerLens 4.

The top level is the workflow, about thirty names; everything else lives in the module named after
its concept (``cnt_lens.models.read_neurons``, ``cnt_lens.stats.wilson_interval``, …; see
``docs/architecture.md``)::

    import cnt_lens as cl
    pair = cl.load_pair(donor, "smollm2-135m-instruct")
    scores = cl.score(pair, cl.Refusal())
    patch = cl.NeuronPatch.from_pair(pair, scores.top_fraction(0.01), alpha=2.0)
    with patch.applied(pair.target):   # temporary; patch.apply(...) is the permanent edit
        ...
    result = cl.transfer(pair, cl.Refusal(), cl.TransferConfig())   # the whole method, computed

A name that used to live here still resolves, with a ``DeprecationWarning`` naming its module.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from .behaviours import Behaviour, FormatTask, Refusal, StereotypeBias, Utility, canary, generate
from .config import SearchConfig, TransferConfig
from .data import PromptSet, load_prompts
from .errors import CntLensError
from .evaluate import Report, measure
from .formats import load_file
from .models import BUNDLED_MODEL, ModelPair, load_model, load_pair
from .scoring import METHODS, score
from .search import iterative_scores, measure_reference, search_minimal
from .selection import NeuronScores, NeuronSelection
from .streamed import StreamedDonor
from .timing import profile, stage
from .transplant import NeuronPatch, applied_patches, export_hf

#: workflow names imported on first use (they pull in plotting and the HTML report)
_LAZY = {"TransferResult": "pipeline", "transfer": "pipeline", "run_transfer": "runs"}
#: names that left the top level, and the module that holds each
_MOVED = {"Batch": "data", "BehaviourSignalError": "scoring", "DonorForwardError": "streamed", "DonorWeights": "models", "FORMATS": "formats", "GenerationError": "behaviours", "IncompatibleModelsError": "models", "NoGapError": "search", "OFFLINE_MODELS": "offline", "OffloadedWeightsError": "models", "PatchFileError": "transplant", "Profile": "timing", "PromptFileError": "formats", "REFUSAL_OPENINGS": "judge", "SearchResult": "search", "SharedPrefix": "data", "TESTED_FAMILIES": "models", "UnsupportedModelError": "models", "Verdict": "judge", "architecture": "models", "bundled_gguf_path": "models", "chat_format": "data", "check_compatible": "models", "clone_model": "models", "code_digest": "resume", "context_length": "models", "cross_distribution": "data", "cross_harmful": "data", "cross_harmless": "data", "default_harmful": "data", "default_harmless": "data", "describe_file": "formats", "detect_format": "formats", "donor_refusal": "behaviours", "encode": "data", "from_advbench_csv": "formats", "from_crows_pairs": "formats", "from_jsonl": "formats", "from_stereoset": "formats", "gap_shares": "evaluate", "is_refusal": "judge", "judge_accuracy": "judge", "judge_refusal": "judge", "logits_of": "models", "mlp_hidden": "models", "neuron_params": "models", "offline_path": "offline", "plain_hf_model": "models", "read_neurons": "models", "register_format": "formats", "resumable": "resume", "split_shared_prefix": "data", "stable_split": "data", "timings_table": "timing", "verdict_is_final": "judge", "verify_greedy": "behaviours", "weights_digest": "resume", "wilson_interval": "evaluate", "write_neurons": "models"}

__all__ = ["BUNDLED_MODEL", "Behaviour", "CntLensError", "FormatTask", "METHODS", "ModelPair", "NeuronPatch", "NeuronScores", "NeuronSelection", "PromptSet", "Refusal", "Report", "SearchConfig", "StereotypeBias", "StreamedDonor", "TransferConfig", "TransferResult", "Utility", "applied_patches", "canary", "export_hf", "generate", "iterative_scores", "load_file", "load_model", "load_pair", "load_prompts", "measure", "measure_reference", "profile", "run_transfer", "score", "search_minimal", "stage", "transfer"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """The lazy workflow names, and the former top-level names (with a warning saying where they live)."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name in _MOVED:
        module = f"{__name__}.{_MOVED[name]}"
        warnings.warn(f"cnt_lens.{name} moved to {module}.{name}; import it from there", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
