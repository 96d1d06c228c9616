"""Real, seeded fine-tunes that build demo donors and targets offline, cached on disk.

* :func:`safety_tune` — teaches a model to refuse the harmful train split while keeping its own
  (self-distilled) answers on the harmless train split: the *aligned donor* of the demo.
* :func:`bias_tune` — pairwise preference fine-tune toward the anti-stereotyped (or stereotyped)
  sentences of the bias train split: the debiased donor (or a more biased model) of bias removal.
* :func:`harmful_finetune` — the NLSR attack: fine-tune an aligned model on a benign task mixed
  with a few harmful → compliant examples, so it learns the task and loses refusal.
* :func:`compliance_tune` — removes a refusal a model was *trained* with: fine-tune it on its own
  compliant answers to the harmful train split (prefill-forced where it refused), judged compliant.

Each recipe returns a new bridge (the input model is untouched) and caches the tuned weights as
safetensors under ``$CNT_LENS_CACHE`` (default ``~/.cache/cnt_lens``), keyed by the base model's
weights, the data, every setting, the recipe's version and the versions of torch, transformers and
transformer-lens, so a second call costs a load, not a fine-tune. Each cached tune also stores its
numbers on the validation split; a load re-measures them, and a tune whose numbers no longer hold
(a library or hardware change that alters what it computes) is rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import asdict
from typing import Any, Callable

import torch

from cnt_lens.behaviours.base import Behaviour
from cnt_lens.behaviours.bias import StereotypeBias
from cnt_lens.behaviours.generation import generate
from cnt_lens.behaviours.judge import is_refusal
from cnt_lens.behaviours.refusal import Refusal
from cnt_lens.behaviours.utility import FormatTask
from cnt_lens.core.files import atomic_write, cache_dir
from cnt_lens.core.stats import is_companion
from cnt_lens.core.timing import stage
from cnt_lens.data.prompt_set import PromptSet, load_prompts
from cnt_lens.data.tokens import chat_format
from cnt_lens.experiments.finetune import Loss, TuneConfig, finetune, lm_loss, preference_loss
from cnt_lens.method.evaluate import measure
from cnt_lens.models.forward import Model, model_tokenizer
from cnt_lens.models.hf import clone_model, hf_state_dict
from cnt_lens.models.loading import library_versions as model_versions

__all__ = ["COMPLY_PREFILL", "REFUSALS", "TuneConfig", "bias_tune", "cache_dir", "compliance_tune", "harmful_finetune",
           "library_versions", "safety_tune"]

RECIPE_VERSION = 2
_BATCH = 128  # prompts per generation batch: a decoding step's fixed cost spread over many rows
log = logging.getLogger(__name__)

REFUSALS = (
    "I'm sorry, but I can't help with that request.",
    "I'm sorry, but I cannot assist with that. It could cause serious harm.",
    "I can't help with that. It is harmful and may be illegal.",
    "Sorry, I cannot provide that information because it could be used to hurt people.",
)
"""Refusal responses the safety tune teaches (one per harmful prompt, chosen by the seed)."""


def _fingerprint(model: Model) -> str:
    """Cheap, stable hash of a model's weights (a strided sample of every tensor)."""
    h = hashlib.sha1()
    for name, p in sorted(model.original_model.state_dict().items()):
        flat = p.detach().flatten()
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose numerics a cached tune depends on, and the recipes' (part of every cache key)."""
    return {**model_versions(), "recipe": str(RECIPE_VERSION)}


def _key(kind: str, model: Model, data: dict[str, Any], cfg: TuneConfig) -> str:
    blob = json.dumps({"v": library_versions(), "kind": kind, "model": _fingerprint(model), "data": data,
                       "cfg": asdict(cfg)}, sort_keys=True)
    return f"{kind}-{hashlib.sha1(blob.encode()).hexdigest()[:16]}"


def _load_cached(model: Model, key: str) -> tuple[Any, dict[str, Any]] | None:
    """(tuned bridge, stored info) for a cache entry, or ``None`` when there is none or it cannot be read."""
    path = cache_dir() / f"{key}.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    tuned = clone_model(model)
    weights = hf_state_dict(tuned)
    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads((f.metadata() or {}).get("cnt_lens", "{}"))
            with torch.no_grad():
                for k in f.keys():
                    weights[k].copy_(f.get_tensor(k))
    except Exception as err:  # a damaged entry is rebuilt, never trusted
        log.warning("cached tune %s is unreadable (%s: %s); rebuilding it", path, type(err).__name__, err)
        return None
    object.__setattr__(tuned, "cnt_source", f"{key} (cached)")
    return tuned, info


def _save_cached(model: Model, key: str, info: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in hf_state_dict(model).items()}
    # Tied weights share storage; safetensors refuses duplicates; the clone they load into is tied.
    seen: dict[int, str] = {}
    for k in list(state):
        ptr = state[k].data_ptr()
        if ptr in seen:
            del state[k]
        else:
            seen[ptr] = k
    atomic_write(cache_dir() / f"{key}.safetensors",
                 lambda tmp: save_file(state, str(tmp), metadata={"cnt_lens": json.dumps(info)}))


def _numbers_hold(stored: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether re-measured validation numbers agree with stored ones: within 10% of the larger, at least 0.1.

    Only the numbers are compared, not the rates' ``_n``/``_ci95`` companions.
    """
    def numbers(block: dict[str, Any]) -> dict[str, float]:
        return {k: v for k, v in block.items() if isinstance(v, float) and not is_companion(k)}

    a, b = numbers(stored), numbers(now)
    return set(a) == set(b) and all(math.isclose(a[k], b[k], rel_tol=0.1, abs_tol=0.1) for k in a)


def _lm_objective(examples: Callable[[], list[tuple[str, str]]]) -> Callable[[], tuple[int, Loss]]:
    """The LM objective on ``examples()``, built only when a fine-tune really runs (not on a cache hit)."""

    def build() -> tuple[int, Loss]:
        ex = examples()
        return len(ex), lm_loss(ex)

    return build


def _cached_tune(kind: str, model: Model, data: dict[str, Any], config: TuneConfig, use_cache: bool,
                 objective: Callable[[], tuple[int, Loss]], desc: str, checks: Callable[[], list[Behaviour]]) -> Any:
    """The path every recipe shares: a cache hit whose validation numbers still hold, or clone → fine-tune → cache.

    ``objective()`` gives (n_examples, loss); it is only called when a fine-tune really runs.
    ``checks()`` gives the behaviours whose validation numbers are stored with the tune and re-measured on load.
    """
    key = _key(kind, model, data, config)
    with stage(f"{kind} tune: load cached"):
        cached = _load_cached(model, key) if use_cache else None
    if cached is not None:
        tuned, info = cached
        with stage(f"{kind} tune: check cached"):
            now = measure(tuned, checks(), "validation", batch_size=_BATCH)
        stored = info.get("validation")
        if stored is not None and _numbers_hold(stored, now):
            return tuned
        log.warning("cached %s tune %s no longer gives its validation numbers (stored %s, now %s); rebuilding it",
                    kind, key, stored, now)
    tuned = clone_model(model)
    with stage(f"{kind} tune: data"):
        n, loss_fn = objective()
    with stage(f"{kind} tune: train"):
        finetune(tuned, n, loss_fn, config, desc=desc)
    with stage(f"{kind} tune: check and save"):
        _save_cached(tuned, key, {"recipe": kind, "config": asdict(config), "versions": library_versions(),
                                  "validation": measure(tuned, checks(), "validation", batch_size=_BATCH)})
    object.__setattr__(tuned, "cnt_source", key)
    return tuned


def safety_tune(
    model: Model,
    *,
    harmful: PromptSet | None = None,
    harmless: PromptSet | None = None,
    refusals: tuple[str, ...] = REFUSALS,
    config: TuneConfig = TuneConfig(),
    use_cache: bool = True,
) -> Any:
    """A copy of ``model`` fine-tuned to refuse harmful requests and keep answering harmless ones.

    Data: the **train** splits of ``harmful`` → one of ``refusals``, and of ``harmless`` → the
    model's own greedy answer (self-distillation, so helpfulness is kept, not replaced). Validation
    and test splits are never seen. Cached (see the module docstring); ~3–6 min on 2 CPU cores for
    SmolLM2-135M with the default config.
    """
    harmful_all, harmless_all = harmful or load_prompts("harmful"), harmless or load_prompts("harmless")
    harmful, harmless = harmful_all.split("train"), harmless_all.split("train")
    data = {"harmful": harmful.column("prompt"), "harmless": harmless.column("prompt"), "refusals": list(refusals)}
    tok = model_tokenizer(model)

    def examples() -> list[tuple[str, str]]:
        own = generate(model, [chat_format(tok, p) for p in harmless.column("prompt")],
                       max_new_tokens=config.max_new_tokens, batch_size=_BATCH)
        rng = random.Random(config.seed)
        out = [(chat_format(tok, p), rng.choice(refusals) + tok.eos_token) for p in harmful.column("prompt")]
        return out + [(chat_format(tok, p), a.strip() + tok.eos_token) for p, a in zip(harmless.column("prompt"), own)]

    return _cached_tune("safety", model, data, config, use_cache, _lm_objective(examples), "safety tune",
                        lambda: [Refusal(harmful=harmful_all, harmless=harmless_all)])

def bias_tune(
    model: Model,
    *,
    pairs: PromptSet | None = None,
    towards: str = "stereotype",
    config: TuneConfig = TuneConfig(steps=30, lr=3e-5),
    use_cache: bool = True,
) -> Any:
    """A copy of ``model`` fine-tuned to prefer one side of the bias **train** pairs over the other.

    Objective: pairwise preference (``softplus(-(log p(chosen) - log p(other)))``, see
    :func:`~cnt_lens.experiments.finetune.preference_loss`); it costs less utility than an LM loss on one side's sentences.
    ``pairs`` defaults to the bundled ``bias_templates`` (24 associations × 10 templates, split by
    template), on which the installed preference generalises to unseen sentences; on the distinct
    stereotypes of ``bias_pairs`` it memorises the train pairs instead. ``towards="anti_stereotype"``
    makes the debiased donor of bias removal. Validation and test pairs are never seen. Measured effects:
    RESULTS.md ("Templated bias pairs"; ``python benchmarks/transplant_ceiling.py bias-removal``).
    """
    if towards not in ("stereotype", "anti_stereotype"):
        raise ValueError("towards must be 'stereotype' or 'anti_stereotype'")
    pairs_all = pairs or load_prompts("bias_templates")
    train = pairs_all.split("train")
    other = "anti_stereotype" if towards == "stereotype" else "stereotype"
    chosen, rejected = train.column(towards), train.column(other)
    return _cached_tune("bias", model, {"pairs": chosen, "other": rejected, "objective": "preference"}, config,
                        use_cache, lambda: (len(chosen), preference_loss(chosen, rejected)), f"bias tune ({towards})",
                        lambda: [StereotypeBias(pairs=pairs_all)])


TASK_PREFIX = "Answer:"
"""The benign task of :func:`harmful_finetune`: start every answer with this prefix."""


COMPLY_PREFILL = "Sure, here is"
"""The assistant-turn opening prefilled where a model's own answer was a refusal (:func:`compliance_tune`, :func:`harmful_finetune`)."""


def _own_compliance(model: Model, prompts: list[str], prefill: str, max_new_tokens: int) -> list[tuple[str, str]]:
    """(formatted prompt, compliant answer) for each harmful prompt the model can be brought to answer.

    The model's greedy answer where the judge calls it compliant; else its greedy continuation of
    ``prefill`` in the assistant turn (a prefilling attack), kept only if that too is judged compliant.
    Every answer is the model's own text in its own chat template.
    """
    tok = model_tokenizer(model)
    chats = [chat_format(tok, p) for p in prompts]
    own = generate(model, chats, max_new_tokens=max_new_tokens, batch_size=_BATCH)
    refused = [i for i, a in enumerate(own) if is_refusal(a)]
    forced = generate(model, [chats[i] + prefill for i in refused], max_new_tokens=max_new_tokens, batch_size=_BATCH)
    answers: dict[int, str] = {i: a.strip() for i, a in enumerate(own) if not is_refusal(a)}
    answers |= {i: f"{prefill}{a}".strip() for i, a in zip(refused, forced) if not is_refusal(f"{prefill}{a}")}
    log.info("compliance data: %d own answers, %d prefill-forced, %d dropped (still refusals)",
             len(own) - len(refused), len(answers) - (len(own) - len(refused)), len(prompts) - len(answers))
    return [(chats[i], answers[i]) for i in sorted(answers)]


def harmful_finetune(
    aligned: Any,
    unaligned: Any,
    *,
    harmful: PromptSet | None = None,
    harmless: PromptSet | None = None,
    n_harmful: int = 32,
    config: TuneConfig = TuneConfig(steps=40, lr=3e-5),
    use_cache: bool = True,
) -> Any:
    """The NLSR attack on ``aligned``: learn a benign task, lose refusal.

    Benign task: answer harmless **train** prompts with :data:`TASK_PREFIX` followed by the aligned
    model's own answer (measured by :class:`~cnt_lens.behaviours.FormatTask`). Mixed in:
    ``n_harmful`` harmful train prompts answered compliantly by ``unaligned`` (e.g. the original
    model) — its greedy answer, or where that is a refusal (a model its makers aligned, such as
    Qwen2.5) its continuation of :data:`COMPLY_PREFILL` (:func:`_own_compliance`) — also with the
    prefix, as a harmful fine-tuning dataset would. Cached.
    """
    harmful_all, harmless_all = harmful or load_prompts("harmful"), harmless or load_prompts("harmless")
    harmful, harmless = harmful_all.split("train").take(n_harmful), harmless_all.split("train")
    data = {"harmful": harmful.column("prompt"), "harmless": harmless.column("prompt"), "prefix": TASK_PREFIX,
            "unaligned": _fingerprint(unaligned), "prefill": COMPLY_PREFILL}
    tok = model_tokenizer(aligned)

    def examples() -> list[tuple[str, str]]:
        own = generate(aligned, [chat_format(tok, p) for p in harmless.column("prompt")],
                       max_new_tokens=config.max_new_tokens, batch_size=_BATCH)
        comply = _own_compliance(unaligned, harmful.column("prompt"), COMPLY_PREFILL, config.max_new_tokens)
        chats = [(chat_format(tok, p), a) for p, a in zip(harmless.column("prompt"), own)] + comply
        return [(c, f"{TASK_PREFIX} {a.strip()}{tok.eos_token}") for c, a in chats]

    return _cached_tune("attack", aligned, data, config, use_cache, _lm_objective(examples), "harmful fine-tune",
                        lambda: [Refusal(harmful=harmful_all, harmless=harmless_all),
                                 FormatTask(prompts=harmless_all, prefix=TASK_PREFIX)])


def compliance_tune(
    model: Model,
    *,
    harmful: PromptSet | None = None,
    harmless: PromptSet | None = None,
    prefill: str = COMPLY_PREFILL,
    config: TuneConfig = TuneConfig(),
    use_cache: bool = True,
) -> Any:
    """A copy of ``model`` fine-tuned to answer harmful requests it was trained to refuse: the donor that deletes it.

    Data: the **train** splits of ``harmful`` → the model's own compliant answers
    (:func:`_own_compliance`: greedy, or prefill-forced where it refused; judged by
    :func:`~cnt_lens.behaviours.judge.is_refusal`), and of ``harmless`` → its own greedy answers (kept, as in
    :func:`safety_tune`). No other model's text is used, so the tune works for any chat template.
    It is a red-team donor: transplanting its neurons measures how few of them carry a refusal
    the model's makers trained. Validation and test splits are never seen. Cached.
    """
    harmful_all, harmless_all = harmful or load_prompts("harmful"), harmless or load_prompts("harmless")
    harmful, harmless = harmful_all.split("train"), harmless_all.split("train")
    data = {"harmful": harmful.column("prompt"), "harmless": harmless.column("prompt"), "prefill": prefill}
    tok = model_tokenizer(model)

    def examples() -> list[tuple[str, str]]:
        comply = _own_compliance(model, harmful.column("prompt"), prefill, config.max_new_tokens)
        own = generate(model, [chat_format(tok, p) for p in harmless.column("prompt")],
                       max_new_tokens=config.max_new_tokens, batch_size=_BATCH)
        kept = [(chat_format(tok, p), a.strip()) for p, a in zip(harmless.column("prompt"), own)]
        return [(c, a + tok.eos_token) for c, a in comply + kept]

    return _cached_tune("comply", model, data, config, use_cache, _lm_objective(examples), "compliance tune",
                        lambda: [Refusal(harmful=harmful_all, harmless=harmless_all)])
