"""The run directory: opened (the canary), filled by one transfer, written once, for the CLI and every application.

:func:`run_transfer` checks that both models generate, calls :func:`~cnt_lens.workflow.pipeline.transfer`
(which computes) inside :func:`~cnt_lens.method.resume.resumable`, and :func:`write_run` writes every file.

A run directory holds ``metrics.json`` (the :class:`~cnt_lens.method.evaluate.Report`), ``patch.safetensors``,
``scores/``, ``frontier.json``, ``items.jsonl``, ``timings.json`` (where the time went, per stage:
:mod:`cnt_lens.core.timing`), ``data.json`` (which prompt files were read: path,
sha256, format and the split of every record), ``patched_model/`` (a standard HF checkpoint of the
target with the patch applied), ``report.html`` and ``resume/`` (every evaluation and scoring pass,
remembered as it finishes: :mod:`cnt_lens.method.resume`; the same command again continues an interrupted
run, and a finished one rerun with another baseline computes only that baseline).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from cnt_lens.behaviours.base import Behaviour
from cnt_lens.behaviours.constraints import Constraint
from cnt_lens.behaviours.generation import canary
from cnt_lens.core.files import atomic_write_text
from cnt_lens.core.timing import Profile, profile, stage
from cnt_lens.method.config import TransferConfig
from cnt_lens.method.evaluate import Report
from cnt_lens.method.resume import resumable
from cnt_lens.method.transplant import export_hf
from cnt_lens.models.forward import device_of
from cnt_lens.models.pair import ModelPair
from cnt_lens.show.report import write_report
from cnt_lens.workflow.pipeline import TransferResult, transfer

__all__ = ["run_transfer", "write_run"]

log = logging.getLogger(__name__)


def run_transfer(
    pair: ModelPair,
    behaviour: Behaviour,
    out: str | Path,
    config: TransferConfig = TransferConfig(),
    *,
    side_effects: Sequence[Behaviour] = (),
    constraint: Constraint | None = None,
    data: dict[str, Any] | None = None,
    progress: bool = True,
) -> Report:
    """Transfer ``behaviour`` from ``pair.donor`` into ``pair.target`` and write the run directory ``out``.

    Opens the run — both models pass :func:`~cnt_lens.behaviours.canary` — then
    :func:`~cnt_lens.workflow.pipeline.transfer` computes (donor and target must differ on the behaviour on
    validation before anything long starts), inside :func:`~cnt_lens.method.resume.resumable` (the
    same call again continues a stopped run), and :func:`write_run` writes every file, each once.
    ``data`` (e.g. from :func:`~cnt_lens.data.formats.describe_file`) is written to ``data.json`` and,
    without its per-record splits, into ``metrics.json``. Returns the written report.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with profile() as prof, resumable(out):
        with stage("canary"):
            for model in (pair.target, pair.donor):
                canary(model)
        result = transfer(pair, behaviour, config, side_effects=side_effects, constraint=constraint,
                          progress=progress)  # measures donor and target first: a pair without a gap stops there
        facts = {"device": str(device_of(pair.target)), "constraint": getattr(constraint, "__name__", None)}
        report = write_run(out, result, pair, behaviour, profile=prof, data=data, **facts)
    log.info("wrote %s in %.0f s", out, prof.total())
    return report


def write_run(out: Path, result: TransferResult, pair: ModelPair, behaviour: Behaviour, *, profile: Profile,
              data: dict[str, Any] | None = None, **facts: Any) -> Report:
    """Write ``result`` as the run directory ``out``, each file once and atomically; return the report written.

    ``metrics.json`` (the report; ``extra`` adds ``facts``, the wall time of ``profile`` so far and
    ``data`` without its per-record splits), ``data.json``, ``patch.safetensors``, ``scores/``,
    ``frontier.json``, ``items.jsonl``, ``patched_model/``, ``report.html`` (with the neuron browser)
    and, last, ``timings.json``.
    """
    report = result.report
    report.extra.update(wall_time_s=round(profile.total(), 1), **facts)
    if data is not None:
        atomic_write_text(out / "data.json", json.dumps(data, indent=1))
        report.extra["data"] = {role: {k: v for k, v in d.items() if k != "split_of"} for role, d in data.items()}
    with stage("write run"):
        report.save(out / "metrics.json")
        result.patch.save(out / "patch.safetensors")
        (out / "scores").mkdir(exist_ok=True)
        for method, s in result.scores.items():
            s.save(out / "scores" / f"{method}.safetensors")
        atomic_write_text(out / "frontier.json", json.dumps(report.frontier, indent=1, default=float))
        atomic_write_text(out / "items.jsonl", "".join(json.dumps({"model": name, **r}, default=float) + "\n"
                                                       for name, recs in result.items.items() for r in recs))
    with stage("export checkpoint"), result.patch.applied(pair.target):
        export_hf(pair.target, out / "patched_model", overwrite=True)
    with stage("report"):
        write_report(out, pair=pair, scores=dict(result.scores), behaviour=behaviour, timings=profile)
    profile.save(out / "timings.json")
    return report
