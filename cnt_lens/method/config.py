"""The settings of one transfer: a frozen :class:`TransferConfig` of four validated sub-configs.

One object is built once (by the CLI, an application or a notebook), passed whole, written into
``metrics.json`` (``extra.config``) and read back from it with :meth:`TransferConfig.from_dict`
(unknown keys are ignored, and the flat settings of older runs are mapped onto the sections), the
layout of SAELens's runner configs. Each stage reads only its own section: ranking (train), search
(validation), baselines, evaluation (test).

Example:
    >>> from dataclasses import replace
    >>> config = TransferConfig(search=SearchConfig(alphas=(1.0, 2.0), max_fraction=0.5))
    >>> config.search.alphas, config.ranking.method
    ((1.0, 2.0), 'weight_attribution')
    >>> TransferConfig.from_dict(config.to_dict()) == config
    True
    >>> replace(config.search, goal=1.5)
    Traceback (most recent call last):
    ...
    cnt_lens.method.config.ConfigError: SearchConfig: goal 1.5 must be a share of the donor-target gap in (0, 1]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

from cnt_lens.core.errors import CntLensError
from cnt_lens.method.scoring import SCORERS

__all__ = ["ALL_BASELINES", "SEARCH_STRATEGIES", "BaselineConfig", "ConfigError", "EvaluationConfig", "RankingConfig",
           "SearchConfig", "TransferConfig", "override"]

#: how the search on validation proposes its points (:attr:`SearchConfig.strategy`)
SEARCH_STRATEGIES = ("bisection", "pareto")

#: every baseline method, in the order reports list them
ALL_BASELINES = ("attribution", "activation_contrast", "wanda", "snip", "weight_diff", "nlsr_drift", "random")


class ConfigError(CntLensError, ValueError):
    """A setting out of range: the message names the section, the field, its value and what it must be."""


def _check(section: object, checks: list[tuple[bool, str]]) -> None:
    """Raise :class:`ConfigError` with the first failing check's message, prefixed with the section's name."""
    problem = next((message for ok, message in checks if not ok), None)
    if problem:
        raise ConfigError(f"{type(section).__name__}: {problem}")


def _methods_unknown(names: tuple[str, ...]) -> list[str]:
    return [m for m in names if m not in SCORERS]


@dataclass(frozen=True)
class RankingConfig:
    """How the main ranking is scored (train split).

    ``rounds > 0``: :func:`~cnt_lens.method.rounds.iterative_scores` of ``method`` re-scored ``rounds`` times up to
    the search's ``max_fraction``, each round's picks applied at ``round_alpha``; ``0``: one pass.
    ``contrast`` subtracts the behaviour's control prompts; side effects with a nonzero
    ``preserve_weights`` entry (default 10 each) are preserved. ``batch_size``: prompts per scoring batch.
    ``stop_overlap``: stop re-scoring once a round would pick at least this share of the remaining budget as
    the round before it would (``None``: run every round).
    """

    method: str = "weight_attribution"
    rounds: int = 0
    round_alpha: float = 6.0
    stop_overlap: float | None = None
    contrast: float = 0.0
    preserve_weights: tuple[float, ...] | None = None
    positions: Any = "all"
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        """Check every field, naming the first that is out of range."""
        object.__setattr__(self, "preserve_weights",
                           None if self.preserve_weights is None else tuple(float(w) for w in self.preserve_weights))
        unknown = _methods_unknown((self.method,))
        _check(self, [(not unknown, f"unknown method {self.method!r}; see cnt_lens.METHODS"),
                      (self.rounds >= 0, f"rounds {self.rounds!r} must be ≥ 0"),
                      (math.isfinite(self.round_alpha) and self.round_alpha > 0,
                       f"round_alpha {self.round_alpha!r} must be a finite number > 0"),
                      (self.stop_overlap is None or 0 < self.stop_overlap <= 1,
                       f"stop_overlap {self.stop_overlap!r} must be a share in (0, 1], or None to run every round"),
                      (self.batch_size >= 1, f"batch_size {self.batch_size!r} must be ≥ 1")])


@dataclass(frozen=True)
class SearchConfig:
    """The minimal-set search on validation (:func:`~cnt_lens.method.search.search_minimal`).

    ``goal``: share of the donor–target gap to close; ``alphas``: transplant strengths tried (1 writes the
    donor's weights); ``max_fraction``: the largest budget, a share of all MLP neurons; bisection over k
    stops within ``tolerance`` (relative) and steps by ×``step``; ``per_layer`` ranks within each layer.
    ``screen``: decide points by cheap estimates and evaluate in full only around their answers, an
    estimate counting as reaching the goal within ``slack``. ``batch_size``: prompts per generation batch.
    ``max_kl``: a point is acceptable only when its first-token KL from the target (nats, on the
    behaviour's harmless inputs of ``split``) is at most this, on top of the run's constraint
    (``None``: no bound; every point reads its KL anyway when the behaviour has such inputs).
    ``strategy``: ``"bisection"`` (:func:`~cnt_lens.method.search.search_minimal`, k bisected at each alpha of
    ``alphas``) or ``"pareto"`` (:func:`~cnt_lens.method.pareto.search_pareto`: ``trials`` points of k and a
    continuous alpha in ``alphas``' range proposed by Optuna against gap closed, first-token KL and neurons,
    sampler seeded with ``seed``; at most ``confirm`` of its front evaluated in full when it screens).
    """

    goal: float = 0.9
    alphas: tuple[float, ...] = (1.0, 2.0, 4.0)
    max_fraction: float = 0.05
    min_k: int = 1
    tolerance: float = 0.1
    step: float = 1.25
    per_layer: bool = False
    screen: bool = False
    slack: float = 0.1
    split: str = "validation"
    batch_size: int = 16
    max_kl: float | None = None
    strategy: str = "bisection"
    trials: int = 24
    confirm: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        """Check every field, naming the first that is out of range."""
        alphas = tuple(self.alphas)
        object.__setattr__(self, "alphas", alphas)
        _check(self, [
            (0 < self.goal <= 1, f"goal {self.goal!r} must be a share of the donor-target gap in (0, 1]"),
            (bool(alphas) and all(isinstance(a, (int, float)) and math.isfinite(a) and a > 0 for a in alphas),
             f"alphas {list(alphas)!r} must be one or more finite numbers > 0 (1 writes the donor's weights)"),
            (0 < self.max_fraction <= 1, f"max_fraction {self.max_fraction!r} must be a share of all MLP neurons "
                                         "in (0, 1]"),
            (self.min_k >= 1, f"min_k {self.min_k!r} must be ≥ 1"),
            (self.tolerance > 0 and self.step > 1, f"tolerance {self.tolerance!r} must be > 0 and step "
                                                   f"{self.step!r} > 1"),
            (self.slack >= 0, f"slack {self.slack!r} must be ≥ 0"),
            (self.batch_size >= 1, f"batch_size {self.batch_size!r} must be ≥ 1"),
            (self.max_kl is None or (isinstance(self.max_kl, (int, float)) and self.max_kl >= 0),
             f"max_kl {self.max_kl!r} must be a first-token KL in nats ≥ 0, or None (no bound)"),
            (self.strategy in SEARCH_STRATEGIES, f"strategy {self.strategy!r} must be one of {SEARCH_STRATEGIES}"),
            (self.trials >= 1 and self.confirm >= 1, f"trials {self.trials!r} and confirm {self.confirm!r} must be "
                                                     "≥ 1")])


@dataclass(frozen=True)
class BaselineConfig:
    """The baselines compared at the main method's budget (validation chooses their alpha; test reports them).

    ``search``: each also gets the main method's whole search for its own minimal set. The random baseline
    is evaluated on test at ``random_seeds`` seeds (the ranking's ``seed``, ``seed + 1``, …).
    """

    methods: tuple[str, ...] = ALL_BASELINES
    search: bool = True
    random_seeds: int = 5

    def __post_init__(self) -> None:
        """Check every field, naming the first that is out of range."""
        object.__setattr__(self, "methods", tuple(self.methods))
        unknown = _methods_unknown(self.methods)
        _check(self, [(not unknown, f"unknown method(s) {unknown} in methods; see cnt_lens.METHODS"),
                      (self.random_seeds >= 1, f"random_seeds {self.random_seeds!r} must be ≥ 1")])


@dataclass(frozen=True)
class EvaluationConfig:
    """The test evaluation: ``batch_size`` prompts per generation batch."""

    batch_size: int = 128

    def __post_init__(self) -> None:
        """Check every field, naming the first that is out of range."""
        _check(self, [(self.batch_size >= 1, f"batch_size {self.batch_size!r} must be ≥ 1")])


#: the flat settings of runs written before the sections existed: old name → (section, field)
_FLAT = {"method": ("ranking", "method"), "score_batch_size": ("ranking", "batch_size"),
         "positions": ("ranking", "positions"), "seed": ("ranking", "seed"), "goal": ("search", "goal"),
         "alphas": ("search", "alphas"), "max_fraction": ("search", "max_fraction"), "screen": ("search", "screen"),
         "screen_slack": ("search", "slack"), "batch_size": ("search", "batch_size"),
         "baselines": ("baselines", "methods"), "search_baselines": ("baselines", "search"),
         "random_seeds": ("baselines", "random_seeds")}
_SECTIONS = {"ranking": RankingConfig, "search": SearchConfig, "baselines": BaselineConfig,
             "evaluation": EvaluationConfig}


@dataclass(frozen=True)
class TransferConfig:
    """Every setting of :func:`~cnt_lens.workflow.pipeline.transfer`, one section per stage (all in ``metrics.json``).

    ``about`` records what the run is (application, model names, protocol): it changes no number.
    The default is the method's own: a searched, screened run over alphas 1–8 against every baseline.
    """

    ranking: RankingConfig = field(default_factory=RankingConfig)
    search: SearchConfig = field(default_factory=lambda: SearchConfig(alphas=(1.0, 2.0, 4.0, 8.0), screen=True,
                                                                      batch_size=128))
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    about: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check that each section is its config type (a dict here is a mistake to name, not to guess)."""
        for name, kind in _SECTIONS.items():
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"TransferConfig: {name} must be a {kind.__name__}, got "
                                  f"{type(getattr(self, name)).__name__} (TransferConfig.from_dict reads dicts)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict (what ``metrics.json`` records as ``extra.config``)."""
        return {name: {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(getattr(self, name)).items()}
                for name in _SECTIONS} | {"about": dict(self.about)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TransferConfig":
        """The config :meth:`to_dict` wrote; unknown keys are ignored, a flat older layout is mapped onto the sections."""
        nested: dict[str, dict[str, Any]] = {name: dict(data[name]) if isinstance(data.get(name), Mapping) else {}
                                             for name in _SECTIONS}
        for old, (section, name) in _FLAT.items():  # a flat (older) layout: its values are not sections
            if old in data and not isinstance(data[old], Mapping):
                nested[section].setdefault(name, data[old])
        if "batch_size" in data and not isinstance(data["batch_size"], Mapping):
            nested["evaluation"].setdefault("batch_size", data["batch_size"])
        base = cls()
        sections = {name: replace(getattr(base, name), **{f.name: _tupled(nested[name][f.name]) for f in fields(kind)
                                                          if f.name in nested[name]})
                    for name, kind in _SECTIONS.items()}
        return cls(**sections, about=dict(data.get("about") or data.get("extra") or {}))


def override(config: TransferConfig, changes: Mapping[str, Any]) -> TransferConfig:
    """``config`` with ``changes`` (``"section.field": value``; ``None`` values skipped) applied and validated.

    Example:
        >>> override(TransferConfig(), {"search.goal": 0.8, "ranking.rounds": None}).search.goal
        0.8
    """
    sections: dict[str, dict[str, Any]] = {}
    for path, value in changes.items():
        section, _, name = path.partition(".")
        if section not in _SECTIONS or name not in {f.name for f in fields(_SECTIONS[section])}:
            raise ConfigError(f"TransferConfig has no setting {path!r}; sections: "
                              + ", ".join(f"{s}.{{{', '.join(f.name for f in fields(k))}}}" for s, k in _SECTIONS.items()))
        if value is not None:
            sections.setdefault(section, {})[name] = _tupled(value)
    return replace(config, **{s: replace(getattr(config, s), **v) for s, v in sections.items()})


def _tupled(value: Any) -> Any:
    """JSON lists back to the tuples the sections hold."""
    return tuple(value) if isinstance(value, list) else value
