"""Does ranking neurons on the donor's whole refusal carry further out of distribution than ranking on its opening?

    CNT_LENS_CACHE=... python benchmarks/objective_ood.py [--app enhance] [--ks 460,1421] [--alpha 4]
        [--no-reference] [--out objective_ood.jsonl]

Builds the application's pair with its cached recipes and takes the cross-distribution prompts
(:func:`cnt_lens.cross_harmful` / :func:`cnt_lens.cross_harmless`: neurons chosen on the bundled set's
train split; AdvBench and the bundled test split in distribution; the role-play, writing and backstory
framings held out). Two rankings, one pass of weight attribution each on the same train prompts:

* ``opening``: :class:`cnt_lens.Refusal`'s default metric, the log-odds that the answer opens with a refusal;
* ``continuation``: ``Refusal(continuation=donor_refusal(donor, ...))``, the log-probability of the
  donor's own most common refusal sentence (found on the same train prompts), read to its end.

Each ranking's top ``k`` neurons for each of ``--ks`` are transplanted at ``--alpha`` and evaluated on
the test split (greedy answers, the refusal judge; utility NLL and MC accuracy on the reference passages), with
the target and donor as reference (``--measure utility`` reads utility alone, without generation). The points
are fixed before any evaluation, so nothing is chosen on test. One JSON line per model: the rates per
role (selection / search / held_out) and per family, with n and Wilson intervals.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from cnt_lens import (
    NeuronPatch,
    Refusal,
    Utility,
    cross_harmful,
    cross_harmless,
    donor_refusal,
    load_model,
    measure,
    score,
)
from cnt_lens.experiments.applications import APPLICATIONS
from cnt_lens.files import append_jsonl
from cnt_lens.models import BUNDLED_MODEL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--app", default="enhance", choices=["enhance"])
    ap.add_argument("--model", default=BUNDLED_MODEL)
    ap.add_argument("--ks", default="460,1421", help="neuron budgets (comma-separated)")
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--no-reference", action="store_true", help="skip the target's and donor's rows")
    ap.add_argument("--measure", default="refusal,utility", help="what to evaluate: refusal, utility or both")
    ap.add_argument("--out", type=Path, default=None, help="also append the lines to this JSONL file")
    args = ap.parse_args()
    app = APPLICATIONS[args.app]
    pair = app.build(load_model(args.model))
    opening = Refusal(harmful=cross_harmful(), harmless=cross_harmless())
    own = donor_refusal(pair.donor, opening, "train", progress=False)
    evaluated = {"refusal": opening, "utility": Utility()}
    behaviours = [evaluated[m] for m in args.measure.split(",")]
    objectives = {"opening": opening, "continuation": Refusal(harmful=opening.harmful, harmless=opening.harmless,
                                                              continuation=own)}

    def show(row: dict) -> None:
        row = {"app": args.app, "donor_refusal": own, **row}
        print(append_jsonl(args.out, row) if args.out else json.dumps(row, default=float), flush=True)

    def evaluate(label: dict, model, edit=contextlib.nullcontext()) -> None:
        with edit:
            show({**label, **measure(model, behaviours, "test", batch_size=32)})

    if not args.no_reference:
        evaluate({"model": "target"}, pair.target)
        evaluate({"model": "donor"}, pair.donor)
    for name, behaviour in objectives.items():
        scores = score(pair, behaviour, "weight_attribution", split="train", progress=False)
        for k in (int(x) for x in args.ks.split(",")):
            patch = NeuronPatch.from_pair(pair, scores.top_k(k), alpha=args.alpha)
            evaluate({"model": "patched", "objective": name, "k": k, "alpha": args.alpha}, pair.target,
                     patch.applied(pair.target))


if __name__ == "__main__":
    main()
