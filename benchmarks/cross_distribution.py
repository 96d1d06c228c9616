"""A finished application run's patch, read in and out of distribution: refusal per prompt role and family.

    CNT_LENS_CACHE=... python benchmarks/cross_distribution.py runs/demo [--examples 2]

Rebuilds the run's pair with the application's cached recipes (``metrics.json`` names the application and
model), loads the run's ``patch.safetensors``, and evaluates target, donor and patched model on the test
prompts of the cross-distribution protocol (:func:`cnt_lens.data.cross_harmful`): the bundled set's test
split (the family the neurons were chosen on), AdvBench's test split, and the role-play, writing and
backstory framings, with their harmless twins for over-refusal. Prints one line per model and group with
n and a Wilson 95% interval, and the patched model's share of the donor–target gap per group; writes
``cross_distribution.json`` (the rates) and ``cross_distribution_items.jsonl`` (every verdict) into the run.
Whichever protocol the run used, this reads the same prompts, so runs can be compared on them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from cnt_lens import NeuronPatch, load_model
from cnt_lens.core.files import atomic_write_text
from cnt_lens.core.stats import format_rate
from cnt_lens.experiments.applications import APPLICATIONS, PROTOCOLS
from cnt_lens.method.config import TransferConfig
from cnt_lens.method.evaluate import gap_shares


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--examples", type=int, default=0, help="print N held-out responses per model")
    args = ap.parse_args()
    run_extra = TransferConfig.from_dict(json.loads((args.run / "metrics.json").read_text())["extra"]["config"]).about  # application and model
    app = APPLICATIONS[run_extra["application"]]
    pair = app.build(load_model(run_extra["model"]))
    patch = NeuronPatch.load(args.run / "patch.safetensors", model=pair.target)
    behaviour = PROTOCOLS["cross"](app.behaviour())
    rates, items = {}, []
    for name, model, edit in (("target", pair.target, contextlib.nullcontext()), ("donor", pair.donor,
                              contextlib.nullcontext()), ("patched", pair.target, patch.applied(pair.target))):
        with edit:
            got = behaviour.evaluate_items(model, "test", batch_size=32, progress=False)
        rates[name] = behaviour.aggregate(got)
        items += [{**i, "model": name} for i in got]
    _print(rates, patch.selection.n)
    for name in ("target", "donor", "patched") if args.examples else ():
        for i in [i for i in items if i["model"] == name and i["role"] == "held_out" and i["set"] == "harmful"][: args.examples]:
            print(f"{name:>8} | {i['prompt'][:60]!r} -> {i['response'][:110]!r} [{i['judge']}]")
    atomic_write_text(args.run / "cross_distribution.json", json.dumps(rates, indent=1))
    atomic_write_text(args.run / "cross_distribution_items.jsonl", "".join(json.dumps(i) + "\n" for i in items))


def _print(rates: dict, n_neurons: int) -> None:
    print(f"patch: {n_neurons} neurons")
    for kind in ("refusal_harmful", "refusal_harmless"):
        for r in gap_shares(rates["target"], rates["donor"], rates["patched"], kind):
            key = r["key"]
            cells = [f"{name} {format_rate(rates[name], key)}" for name in ("target", "donor", "patched")]
            print(f"{key:<32} " + "  ".join(cells) + f"  share of gap {r['share']:.2f}")


if __name__ == "__main__":
    main()
