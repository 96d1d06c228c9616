"""A run directory, end to end, for ``cnt-lens transfer`` (any pair) and every application.

Checks → reference → main ranking → :func:`~cnt_lens.pipeline.transfer` → exported checkpoint
and report.

A run directory holds ``metrics.json`` (the :class:`~cnt_lens.evaluate.Report`), ``patch.safetensors``,
``scores/``, ``frontier.json``, ``items.jsonl``, ``timings.json`` (where the time went, per stage:
:mod:`cnt_lens.timing`), ``data.json`` (which prompt files were read: path,
sha256, format and the split of every record), ``patched_model/`` (a standard HF checkpoint of the
target with the patch applied), ``report.html`` and ``resume/`` (every evaluation and scoring pass,
remembered as it finishes: :mod:`cnt_lens.resume`; the same command again continues an interrupted
run, and a finished one rerun with another baseline computes only that baseline).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from .behaviours import Behaviour, canary
from .constraints import Constraint
from .evaluate import Report
from .files import atomic_write_text
from .models import ModelPair, device_of
from .pipeline import TransferConfig, transfer
from .report import write_report
from .resume import resumable
from .scoring import SCORERS, score
from .search import iterative_scores, measure_reference
from .timing import profile, stage
from .transplant import export_hf

__all__ = ["run_transfer"]

log = logging.getLogger(__name__)


def run_transfer(
    pair: ModelPair,
    behaviour: Behaviour,
    out: str | Path,
    *,
    side_effects: Sequence[Behaviour] = (),
    constraint: Constraint | None = None,
    config: TransferConfig = TransferConfig(),
    rounds: int = 0,
    round_alpha: float = 6.0,
    contrast: float = 0.0,
    preserve_weights: Sequence[float] | None = None,
    data: dict[str, Any] | None = None,
    progress: bool = True,
) -> Report:
    """Transfer ``behaviour`` from ``pair.donor`` into ``pair.target`` and write the run directory ``out``.

    Both models pass :func:`~cnt_lens.behaviours.canary` and must differ on the behaviour on validation
    before anything long starts. With ``rounds > 0`` the main ranking is
    :func:`~cnt_lens.search.iterative_scores` of ``config.method`` (re-scored ``rounds`` times up to the
    budget, each round's picks applied at ``round_alpha``; ``contrast`` against the behaviour's control
    prompts; side effects with a nonzero ``preserve_weights`` entry, default 10 each, preserved);
    with ``rounds=0`` it is one pass of ``config.method`` with the same ``contrast`` and preserved side
    effects (when the method takes them: the attribution methods). ``data`` (e.g. from
    :func:`~cnt_lens.formats.describe_file`) is written to ``data.json`` and, without its per-record
    splits, into ``metrics.json``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = list(preserve_weights) if preserve_weights is not None else [10.0] * len(side_effects)
    if len(weights) != len(side_effects):
        raise ValueError(f"{len(weights)} preserve weights for {len(side_effects)} side effects")
    with profile() as prof, resumable(out):
        report, patch, all_scores = _transfer_stages(pair, behaviour, out, side_effects, constraint, config, rounds,
                                                     round_alpha, contrast, weights, progress)
        report.extra.update(wall_time_s=round(prof.total(), 1), device=str(device_of(pair.target)),
                            constraint=getattr(constraint, "__name__", None))
        if data is not None:
            atomic_write_text(out / "data.json", json.dumps(data, indent=1))
            report.extra["data"] = {role: {k: v for k, v in d.items() if k != "split_of"} for role, d in data.items()}
        report.save(out / "metrics.json")
        if patch is not None:
            with stage("export checkpoint"), patch.applied(pair.target):
                export_hf(pair.target, out / "patched_model", overwrite=True)
        with stage("report"):
            prof.save(out / "timings.json")  # so far: the report shows it
            write_report(out, pair=pair, scores=all_scores, behaviour=behaviour)
        prof.save(out / "timings.json")
    log.info("wrote %s in %.0f s", out, prof.total())
    return report


def _transfer_stages(pair: ModelPair, behaviour: Behaviour, out: Path, side_effects: Sequence[Behaviour],
                     constraint: Constraint | None, config: TransferConfig, rounds: int, round_alpha: float,
                     contrast: float, weights: list[float], progress: bool) -> Any:
    """Canary, reference, the main ranking and :func:`~cnt_lens.pipeline.transfer`: its result."""
    with stage("canary"):
        for model in (pair.target, pair.donor):
            canary(model)
    with stage("donor and target (validation)"):
        reference = measure_reference(pair, behaviour, side_effects, split="validation",
                                      batch_size=config.batch_size)
    scores = None
    kept = [(b, w) for b, w in zip(side_effects, weights) if w]
    penalties = {"contrast": contrast, "preserve": [b for b, _ in kept], "preserve_weight": [w for _, w in kept]}
    if rounds > 0:
        with stage(f"score {config.method}, {rounds} rounds"):
            scores = iterative_scores(pair, behaviour, budget=config.max_fraction, rounds=rounds, alpha=round_alpha,
                                      method=config.method, batch_size=config.score_batch_size, progress=progress,
                                      **penalties)
    elif (contrast or kept) and set(penalties) <= set(SCORERS[config.method].options):
        # one pass with the same penalties; a method without them (a baseline as main) is scored by transfer
        with stage(f"score {config.method}"):
            scores = score(pair, behaviour, config.method, split="train", batch_size=config.score_batch_size,
                           positions=config.positions, progress=progress, **penalties)
    result = transfer(pair, behaviour, side_effects=side_effects, constraint=constraint, config=config,
                      scores=scores, reference=reference, out_dir=out, progress=progress)
    result.report.extra["ranking"] = {"rounds": rounds, "round_alpha": round_alpha, "contrast": contrast,
                                      "preserve_weights": weights}
    return result
