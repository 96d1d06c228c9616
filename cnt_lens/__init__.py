"""cnt_lens: move a behaviour between LLMs by transplanting the MLP neurons that carry it.

Finds the neurons that carry a behaviour in a donor LLM and transplants them, in weight space, into
a target LLM of the same architecture (CNT; NLSR), on TransformerLens 4.

The top level is the workflow, about thirty names; everything else lives in the module named after
its concept (``cnt_lens.models.read_neurons``, ``cnt_lens.core.stats.wilson_interval``, …), in folders that are
the layers (``docs/architecture.md``)::

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

from cnt_lens.behaviours.base import Behaviour
from cnt_lens.behaviours.bias import StereotypeBias
from cnt_lens.behaviours.generation import canary, generate
from cnt_lens.behaviours.refusal import Refusal
from cnt_lens.behaviours.utility import FormatTask, Utility
from cnt_lens.core.errors import CntLensError
from cnt_lens.core.moved import MOVED_MODULES, install
from cnt_lens.core.timing import profile, stage
from cnt_lens.data.formats import load_file
from cnt_lens.data.prompt_set import PromptSet, load_prompts
from cnt_lens.method.config import SearchConfig, TransferConfig
from cnt_lens.method.evaluate import Report, measure
from cnt_lens.method.rounds import iterative_scores
from cnt_lens.method.scoring import METHODS, score
from cnt_lens.method.search import measure_reference, search_minimal
from cnt_lens.method.selection import NeuronScores, NeuronSelection
from cnt_lens.method.transplant import NeuronPatch, applied_patches, export_hf
from cnt_lens.models.loading import BUNDLED_MODEL, load_model
from cnt_lens.models.pair import ModelPair, load_pair
from cnt_lens.models.streamed import StreamedDonor

install()  # former module paths (cnt_lens.search, …) still import, with a warning

#: workflow names imported on first use (they pull in plotting and the HTML report)
_LAZY = {"TransferResult": "workflow.pipeline", "transfer": "workflow.pipeline", "run_transfer": "workflow.runs"}
#: names that left the top level, and the module that holds each
_MOVED = {"Batch": "data", "BehaviourSignalError": "method.scoring.common", "DonorForwardError": "models.streamed", "DonorWeights": "models", "FORMATS": "data.formats", "GenerationError": "behaviours", "IncompatibleModelsError": "models", "NoGapError": "method.search", "OFFLINE_MODELS": "models.offline", "OffloadedWeightsError": "models", "PatchFileError": "method.patch_file", "Profile": "core.timing", "PromptFileError": "data.rows", "REFUSAL_OPENINGS": "behaviours.judge", "SearchResult": "method.search", "SharedPrefix": "data", "TESTED_FAMILIES": "models", "UnsupportedModelError": "models", "Verdict": "behaviours.judge", "architecture": "models", "bundled_gguf_path": "models", "chat_format": "data", "check_compatible": "models", "clone_model": "models", "code_digest": "method.resume", "context_length": "models", "cross_distribution": "data", "cross_harmful": "data", "cross_harmless": "data", "default_harmful": "data", "default_harmless": "data", "describe_file": "data.formats", "detect_format": "data.formats", "donor_refusal": "behaviours", "encode": "data", "from_advbench_csv": "data.formats", "from_crows_pairs": "data.formats", "from_jsonl": "data.formats", "from_stereoset": "data.formats", "gap_shares": "method.evaluate", "is_refusal": "behaviours.judge", "judge_accuracy": "behaviours.judge", "judge_refusal": "behaviours.judge", "logits_of": "models", "mlp_hidden": "models", "neuron_params": "models", "offline_path": "models.offline", "plain_hf_model": "models", "read_neurons": "models", "register_format": "data.formats", "resumable": "method.resume", "split_shared_prefix": "data", "stable_split": "data", "timings_table": "core.timing", "verdict_is_final": "behaviours.judge", "verify_greedy": "behaviours", "weights_digest": "method.resume", "wilson_interval": "core.stats", "write_neurons": "models"}

__all__ = ["BUNDLED_MODEL", "Behaviour", "CntLensError", "FormatTask", "METHODS", "ModelPair", "NeuronPatch", "NeuronScores", "NeuronSelection", "PromptSet", "Refusal", "Report", "SearchConfig", "StereotypeBias", "StreamedDonor", "TransferConfig", "TransferResult", "Utility", "applied_patches", "canary", "export_hf", "generate", "iterative_scores", "load_file", "load_model", "load_pair", "load_prompts", "measure", "measure_reference", "profile", "run_transfer", "score", "search_minimal", "stage", "transfer"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """The lazy workflow names; former top-level names and modules (with a warning saying where they live)."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name in _MOVED:
        module = f"{__name__}.{_MOVED[name]}"
        warnings.warn(f"cnt_lens.{name} moved to {module}.{name}; import it from there", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(module), name)
    if f"{__name__}.{name}" in MOVED_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
