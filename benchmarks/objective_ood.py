"""Does ranking neurons on the donor's whole refusal carry further out of distribution than ranking on its opening?

    CNT_LENS_CACHE=... python benchmarks/objective_ood.py [--app enhance] [--ks 460,1421] [--alpha 4]
        [--objectives opening,continuation] [--rounds 8 --round-alpha 4] [--no-reference]
        [--out objective_ood.jsonl]

Builds the application's pair with its cached recipes and takes the cross-distribution prompts
(:func:`cnt_lens.cross_harmful` / :func:`cnt_lens.cross_harmless`: neurons chosen on the bundled set's
train split; AdvBench and the bundled test split in distribution; the role-play, writing and backstory
framings held out). Two rankings, one pass of weight attribution each on the same train prompts:

* ``opening``: :class:`cnt_lens.Refusal`'s default metric, the log-odds that the answer opens with a refusal;
* ``continuation``: ``Refusal(continuation=donor_refusal(donor, ...))``, the log-probability of the
  donor's own most common refusal sentence (found on the same train prompts), read to its end.

With ``--rounds R`` each ranking is instead chosen in ``R`` re-scoring rounds
(:func:`cnt_lens.iterative_scores`: each round scores on the target as patched by the earlier rounds at
``--round-alpha``), over a budget of the largest of ``--ks``.

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

from cnt_lens import NeuronPatch, Refusal, Utility, iterative_scores, load_model, measure, score
from cnt_lens.behaviours import donor_refusal
from cnt_lens.core.files import append_jsonl
from cnt_lens.data import cross_harmful, cross_harmless
from cnt_lens.experiments.applications import APPLICATIONS
from cnt_lens.models import BUNDLED_MODEL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--app", default="enhance", choices=["enhance"])
    ap.add_argument("--model", default=BUNDLED_MODEL)
    ap.add_argument("--ks", default="460,1421", help="neuron budgets (comma-separated)")
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--objectives", default="opening,continuation", help="rankings to build (comma-separated)")
    ap.add_argument("--rounds", type=int, default=0, help="re-scoring rounds (0: one pass of weight attribution)")
    ap.add_argument("--round-alpha", type=float, default=4.0, help="scale the rounds apply their picks at")
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
    ks = [int(x) for x in args.ks.split(",")]
    for name in args.objectives.split(","):
        behaviour = objectives[name]
        if args.rounds:
            scores = iterative_scores(pair, behaviour, budget=max(ks) / pair.n_neurons, rounds=args.rounds,
                                      alpha=args.round_alpha, progress=False)
        else:
            scores = score(pair, behaviour, "weight_attribution", split="train", progress=False)
        for k in ks:
            patch = NeuronPatch.from_pair(pair, scores.top_k(k), alpha=args.alpha)
            label = {"model": "patched", "objective": name, "k": k, "alpha": args.alpha, "rounds": args.rounds,
                     **({"round_alpha": args.round_alpha} if args.rounds else {})}
            evaluate(label, pair.target, patch.applied(pair.target))


if __name__ == "__main__":
    main()
