"""Choose a finished application run's point again with the current search, on the run's own saved ranking.

    CNT_LENS_CACHE=... python benchmarks/search_again.py runs/demo --out runs/demo-again [--slack 0.1] [--no-screen]

Rebuilds the run's pair with the application's cached recipes (``metrics.json`` names the application and
model), loads the main ranking from ``scores/`` and the donor's and target's validation numbers from
``metrics.json``, takes the run's prompt protocol and objective (``--protocol``, ``--objective``), and runs :func:`cnt_lens.workflow.pipeline.transfer` with the application's settings, no
baselines and one random seed: the search on validation, then target, donor and the chosen patch on test.
So a change to the search is measured on the same neurons without re-scoring (the re-scoring rounds are
most of a demo's scoring time). Prints the chosen point, the validation frontier the search measured,
and the test table; ``--out`` gets the usual run files.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from cnt_lens import NeuronScores, load_model
from cnt_lens.core.records import Reference
from cnt_lens.experiments.applications import APPLICATIONS, PROTOCOLS
from cnt_lens.method.config import SearchConfig, TransferConfig, override
from cnt_lens.method.resume import resumable
from cnt_lens.workflow.pipeline import transfer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--slack", type=float, default=SearchConfig().slack)
    ap.add_argument("--no-screen", dest="screen", action="store_false")
    args = ap.parse_args()
    metrics = json.loads((args.run / "metrics.json").read_text())
    extra = metrics["extra"]
    run_config = TransferConfig.from_dict(extra["config"])
    about = {**extra, **run_config.about}  # older runs kept protocol and continuation beside the config
    app = APPLICATIONS[about["application"]]
    pair = app.build(load_model(about["model"]))
    scores = NeuronScores.load(args.run / "scores" / f"{metrics['patched']['method']}.safetensors")
    config = override(replace(run_config, about={**run_config.about, "again_from": str(args.run)}),
                      {"baselines.methods": (), "search.screen": args.screen, "search.slack": args.slack,
                       "baselines.random_seeds": 1})
    behaviour = PROTOCOLS[about.get("protocol", "split")](app.behaviour())  # the run's prompts and roles
    if about.get("continuation"):  # and what its ranking read (``--objective continuation``)
        behaviour = replace(behaviour, continuation=about["continuation"])
    with resumable(args.out):
        result = transfer(pair, behaviour, config, side_effects=app.side_effects(), constraint=app.constraint,
                          scores=scores, reference=Reference.from_dict(extra["validation_reference"]), progress=False)
    report = result.report
    print(f"chosen: {report.patched['n_neurons']} neurons, alpha {report.patched['alpha']}; "
          f"goal reached on validation: {report.patched['goal_reached_on_validation']}")
    for p in report.frontier:
        print(f"  {p['measured']:<10} k={p['k']:<5} alpha={p['alpha']:<4} gap closed {p['gap_closed']:.2f} "
              f"harmful {p.get('refusal_harmful', float('nan')):.3f} harmless {p.get('refusal_harmless', float('nan')):.3f}")
    print(report.table())


if __name__ == "__main__":
    main()
