"""The applications of CNT and NLSR, end to end on the bundled model (``cnt-lens run APP``).

==================  =======================================  ========================================
application         target ← donor                           behaviour (goal)
==================  =======================================  ========================================
``enhance``         SmolLM2 ← safety-tuned SmolLM2           refusal up (function addition)
``disalign``        safety-tuned ← SmolLM2                   refusal down (deletion, red team)
``delete-refusal``  the model ← its compliance tune          its makers' refusal down (red team)
``realign``         attacked ← safety-tuned (NLSR)           refusal back, benign task kept
``bias-removal``    SmolLM2 ← anti-stereotype-tuned SmolLM2  stereotype score down (deletion)
==================  =======================================  ========================================

Each builds its models with the cached recipes, runs :func:`~cnt_lens.workflow.pipeline.transfer` with
iterative weight attribution as the main ranking and the published baselines at the same budget,
and writes ``metrics.json``, the patch, the HF checkpoint and ``report.html`` to the run directory.

Each search goal sits a margin above its quality bar (0.95 for a 0.90 bar, 0.90 for a 0.80 bar):
the minimal set is the *first* k that passes on validation, so its validation score is biased
toward the line (winner's curse), and the validation splits hold 20–30 prompts, where one prompt is
3–5 points. Margins are fixed before a run; each run reads the test split once, at the end (for refusal:
the bundled test prompts beside AdvBench's and three framings no choice saw, reported apart;
:func:`~cnt_lens.data.default_harmful`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from cnt_lens.behaviours.base import Behaviour
from cnt_lens.behaviours.bias import StereotypeBias
from cnt_lens.behaviours.constraints import no_more_over_refusal, task_kept, utility_kept
from cnt_lens.behaviours.generation import canary
from cnt_lens.behaviours.refusal import Refusal, donor_refusal
from cnt_lens.behaviours.utility import FormatTask, Utility
from cnt_lens.core.timing import profile, stage
from cnt_lens.data.prompt_set import cross_harmful, cross_harmless, load_prompts
from cnt_lens.experiments.recipes import TASK_PREFIX, bias_tune, compliance_tune, harmful_finetune, safety_tune
from cnt_lens.method.config import BaselineConfig, RankingConfig, TransferConfig
from cnt_lens.method.resume import resumable
from cnt_lens.models.loading import BUNDLED_MODEL, load_model
from cnt_lens.models.pair import ModelPair
from cnt_lens.workflow.runs import run_transfer

__all__ = ["APPLICATIONS", "PROTOCOLS", "Application", "run_application"]


@dataclass
class Application:
    """One application: how its pair is built and which behaviour, constraint and settings it runs."""
    name: str
    build: Callable[[Any], ModelPair]
    behaviour: Callable[[], Behaviour]
    side_effects: Callable[[], list[Behaviour]]
    constraint: Callable[[dict, dict], bool]
    preserve_weights: tuple[float, ...] = (30.0,)  # per side effect, for the ranking; 0 = not preserved
    # re-scoring rounds of the main ranking (iterative_scores), applied at round_alpha. Each round scores
    # the behaviour and every preserved one over the train split (~1 min per behaviour on 2 CPU cores), so
    # realign (4 behaviours) and disalign use 4 rounds to keep the CPU run near 30 min.
    rounds: int = 8
    round_alpha: float = 6.0
    stop_overlap: float | None = None  # stop re-scoring once rounds agree on this share of the next picks
    alphas: tuple[float, ...] = (2.0, 4.0, 6.0, 8.0)  # searched on validation
    goal: float = 0.95
    max_fraction: float = 0.05
    contrast: float = 1.0
    baselines: tuple[str, ...] = ("attribution", "activation_contrast", "wanda", "snip", "weight_diff",
                                  "nlsr_drift", "random")
    notes: dict[str, Any] = field(default_factory=dict)
    refuser: str = "donor"  # which model of the pair refuses: donor (function addition) or target (deletion)

    def config(self, model: str = BUNDLED_MODEL) -> TransferConfig:
        """The application's own settings (what ``cnt-lens run`` overrides option by option)."""
        return TransferConfig(
            ranking=RankingConfig(rounds=self.rounds, round_alpha=self.round_alpha, stop_overlap=self.stop_overlap,
                                  contrast=self.contrast, preserve_weights=self.preserve_weights),
            search=replace(TransferConfig().search, goal=self.goal, alphas=self.alphas, max_fraction=self.max_fraction),
            baselines=BaselineConfig(methods=self.baselines), about={"application": self.name, "model": model})


def _pair_enhance(base: Any) -> ModelPair:
    return ModelPair(donor=safety_tune(base), target=base)


def _pair_disalign(base: Any) -> ModelPair:
    return ModelPair(donor=base, target=safety_tune(base))


def _pair_delete(base: Any) -> ModelPair:
    # a refusal the model's makers trained (e.g. Qwen2.5's), deleted with neurons of its own compliance tune
    return ModelPair(donor=compliance_tune(base), target=base)


def _pair_realign(base: Any) -> ModelPair:
    aligned = safety_tune(base)
    return ModelPair(donor=aligned, target=harmful_finetune(aligned, base))


def _bias_behaviour() -> StereotypeBias:
    # templated pairs, split by template: the tuned bias generalises to the held-out sentences
    return StereotypeBias(pairs=load_prompts("bias_templates"))


def _pair_bias(base: Any) -> ModelPair:
    # the target's bias is SmolLM2's own; the donor is its debiased sibling
    return ModelPair(donor=bias_tune(base, pairs=load_prompts("bias_templates"), towards="anti_stereotype"),
                     target=base)


APPLICATIONS: dict[str, Application] = {
    "enhance": Application("enhance", _pair_enhance, lambda: Refusal(), lambda: [Utility()],
                           no_more_over_refusal, preserve_weights=(10.0,), contrast=0.5),
    "disalign": Application("disalign", _pair_disalign, lambda: Refusal(), lambda: [Utility()],
                            utility_kept, contrast=0.0, rounds=4, refuser="target"),
    # for models that refuse on their own (not the bundled SmolLM2, which refuses nothing)
    "delete-refusal": Application("delete-refusal", _pair_delete, lambda: Refusal(), lambda: [Utility()],
                                  utility_kept, contrast=0.0, rounds=4, refuser="target"),
    # the attacked model opens every answer with the task's prefix: read refusal after it, and keep the task.
    # Refusal and the prefix compete for the first answer token, so the task is preserved with the utility's
    # weight (RESULTS.md, "Realign: the benign task was what stopped a smaller set").
    "realign": Application("realign", _pair_realign, lambda: Refusal(response_prefix=TASK_PREFIX,
                                                                  toward=1.0),
                           lambda: [Utility(), FormatTask(prefix=TASK_PREFIX)], task_kept,
                           preserve_weights=(10.0, 10.0), contrast=0.5, rounds=4, alphas=(1.0, 2.0, 4.0, 5.0, 6.0)),
    # SmolLM2's own bias, removed with neurons of its debiased sibling: the debiasing tune lives in the MLPs
    # (benchmarks/transplant_ceiling.py bias-removal --top 0.01 --top-alphas 1,2,4,8,16); the opposite pair
    # (stereotype-tuned ← SmolLM2) put much of the bias outside them (RESULTS.md, bias removal).
    "bias-removal": Application("bias-removal", _pair_bias, _bias_behaviour, lambda: [Utility()], utility_kept,
                                goal=0.9, max_fraction=0.02, contrast=0.0, round_alpha=8.0,
                                alphas=(2.0, 4.0, 6.0, 8.0, 12.0)),
}


def _cross(behaviour: Behaviour) -> Behaviour:
    if not isinstance(behaviour, Refusal):
        raise ValueError(f"the cross-distribution protocol re-splits refusal prompts by family; {behaviour.name!r} "
                         "has no prompt families (bias-removal's templates are split by template already)")
    return replace(behaviour, harmful=cross_harmful(), harmless=cross_harmless())


#: How an application's prompts are split between choosing neurons, choosing k and alpha, and the report.
#: ``split``: each bundled set's own train/validation/test (AdvBench's test and the framings added to the report);
#: ``cross``: by family (:func:`~cnt_lens.data.cross_harmful`): neurons on the bundled set, k and alpha on
#: AdvBench, and role-play, writing and backstory framings held out for the report.
PROTOCOLS: dict[str, Callable[[Behaviour], Behaviour]] = {"split": lambda b: b, "cross": _cross}


def _own_refusal(behaviour: Behaviour, refusing: Any) -> Behaviour:
    return replace(behaviour, continuation=donor_refusal(refusing, behaviour, "train", progress=False))


#: What the neuron rankings read of refusal. ``opening``: the log-odds that the answer opens with a refusal
#: (:class:`~cnt_lens.Refusal`'s default); ``continuation``: the log-probability of the refusing model's own
#: most common refusal sentence (the donor's for addition, the target's for deletion), read to its end
#: (:func:`~cnt_lens.donor_refusal` on the train prompts). Each maps (behaviour, refusing model) to the
#: behaviour the run scores with.
OBJECTIVES: dict[str, Callable[[Behaviour, Any], Behaviour]] = {
    "opening": lambda b, refusing: b, "continuation": _own_refusal}


def run_application(name: str, out: str | Path, config: TransferConfig | None = None, *, model: str = BUNDLED_MODEL,
                    protocol: str = "split", objective: str = "opening", device: str | None = None,
                    progress: bool = True) -> Any:
    """Run one application end to end and write its run directory; returns the :class:`Report`.

    ``model`` is the base the application's recipes tune (any :func:`~cnt_lens.load_model` source;
    default the bundled SmolLM2). ``config`` replaces the application's own settings
    (:meth:`Application.config`; :func:`~cnt_lens.method.config.override` changes some of them, e.g. to fit a
    larger model's run on a CPU); ``protocol`` is one of :data:`PROTOCOLS` and ``objective`` one of
    :data:`OBJECTIVES` (refusal applications only). Every stage's wall time goes to ``timings.json``
    in ``out``, and every evaluation and scoring pass to ``out/resume`` (:mod:`cnt_lens.method.resume`): the
    same call again continues a run that was stopped. ``device`` (e.g. ``"cuda"``) holds both models
    there; the fine-tune recipes train there too. Their cache key is the weights and settings, not the
    device, so a donor cached on one device is reused on another (greedy generations can then differ
    in a few prompts from float rounding).
    """
    if name not in APPLICATIONS:
        raise ValueError(f"unknown application {name!r}; one of {sorted(APPLICATIONS)}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; one of {sorted(PROTOCOLS)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; one of {sorted(OBJECTIVES)}")
    app = APPLICATIONS[name]
    config = config if config is not None else app.config(model)
    behaviour = PROTOCOLS[protocol](app.behaviour())  # before any loading: a wrong protocol fails in seconds
    if objective != "opening" and not isinstance(behaviour, Refusal):
        raise ValueError(f"objective {objective!r} reads a refusal; {name!r} transfers {behaviour.name!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with profile() as _, resumable(out):  # one profile: the load and the recipes count in the run's timings
        with stage("load model"):
            base = load_model(model, device=device)
        with stage("canary"):
            canary(base, expect="Paris")  # seconds: a broken model or generation path stops here, before any tune
        with stage("build donor and target (recipes)"):
            pair = app.build(base)
        with stage("objective"):
            behaviour = OBJECTIVES[objective](behaviour, getattr(pair, app.refuser))
        about = {**config.about, "application": name, "model": model, "protocol": protocol, "objective": objective,
                 "continuation": getattr(behaviour, "continuation", "")}
        return run_transfer(pair, behaviour, out, replace(config, about=about), side_effects=app.side_effects(),
                            constraint=app.constraint, progress=progress)
