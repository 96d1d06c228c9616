"""A run's pair and behaviour rebuilt from its ``metrics.json``, for benchmarks that re-read a run.

    from run_pair import rebuilt  # a sibling module of the benchmarks that import it
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cnt_lens import load_model
from cnt_lens.experiments.applications import APPLICATIONS, OBJECTIVES, PROTOCOLS
from cnt_lens.method.config import TransferConfig


def rebuilt(run: Path) -> tuple[dict[str, Any], TransferConfig, Any, Any, Any]:
    """(metrics, config, application, pair, behaviour) of ``run``: its application's recipes (cached) on its model.

    Exits with a message naming the file when ``run`` is not a finished ``cnt-lens run`` directory. The behaviour
    gets the run's protocol and objective (``about`` in the config), as :func:`~cnt_lens.experiments.applications.run_application` built it.
    """
    if not (run / "metrics.json").is_file():
        raise SystemExit(f"{run}: no metrics.json there (give a finished `cnt-lens run` directory)")
    metrics = json.loads((run / "metrics.json").read_text())
    if "config" not in metrics.get("extra", {}):
        raise SystemExit(f"{run}/metrics.json: no extra.config (not written by `cnt-lens run`)")
    config = TransferConfig.from_dict(metrics["extra"]["config"])
    about = config.about
    if about.get("application") not in APPLICATIONS:
        raise SystemExit(f"{run}/metrics.json: about.application is {about.get('application')!r}; "
                         f"this reads runs of `cnt-lens run` ({', '.join(APPLICATIONS)})")
    app = APPLICATIONS[about["application"]]
    pair = app.build(load_model(about["model"]))
    behaviour = OBJECTIVES[about.get("objective", "opening")](PROTOCOLS[about.get("protocol", "split")](
        app.behaviour()), getattr(pair, app.refuser))
    return metrics, config, app, pair, behaviour
