"""What makes a minimal refusal transplant work on SmolLM2-135M: the exploration behind the demo.

    python benchmarks/explore_refusal.py [--only plain,contrast,utility,iterative,rounds,weights] [--device cuda]
    (~40 min on 2 cores for the first four; ~3 min on one H100 for all)

Donor: ``recipes.safety_tune`` (default config, cached). Every row applies a patch to the bundled
target, measures refusal (16 greedy tokens) and utility on the **validation** split, and reverts.
Scores are from the **train** split. Prints one JSON line per row.
"""

from __future__ import annotations

import argparse
import json

import torch

from cnt_lens import ModelPair, NeuronPatch, NeuronScores, Refusal, Utility, load_model, measure
from cnt_lens.experiments.recipes import safety_tune
from cnt_lens.method.rounds import iterative_scores
from cnt_lens.method.scoring.attribution import attribution_scores


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--only", default="plain,contrast,utility,iterative")
    p.add_argument("--device", default=None)
    pairs = lambda t: [tuple(map(float, x.split(":"))) for x in t.split(",")]  # noqa: E731
    p.add_argument("--single", type=pairs, default=pairs("0:0,1:0,1:3,1:10,1:30"),
                   help="weights: contrast:utility weights of single-pass rows")
    p.add_argument("--iterated", type=pairs, default=pairs("1:3,1:10"),
                   help="weights: contrast:utility weights of 8-round iterative rows")
    args = p.parse_args()
    which = args.only.split(",")
    target = load_model("smollm2-135m-instruct", device=args.device)
    pair = ModelPair(donor=safety_tune(target), target=target)
    refusal, utility = Refusal(max_new_tokens=16), Utility()
    tok = pair.tokenizer

    def row(name: str, scores: torch.Tensor | NeuronScores, frac: float, alpha: float) -> None:
        s = scores if isinstance(scores, NeuronScores) else NeuronScores(scores, name)
        patch = NeuronPatch.from_pair(pair, s.top_fraction(frac), alpha)
        patch.apply(target)
        try:
            m = measure(target, [refusal, utility], "validation", batch_size=32)
        finally:
            patch.revert(target)
        print(json.dumps({"selection": name, "fraction": frac, "alpha": alpha, **{k: round(v, 3) for k, v in m.items()}}),
              flush=True)

    for name, model in (("target", pair.target), ("donor", pair.donor)):
        print(json.dumps({"reference": name, **measure(model, [refusal, utility], "validation", batch_size=32)}), flush=True)

    # first-order estimates of each metric's change when a neuron is copied
    def raw(behaviour, batches):
        return attribution_scores(pair, behaviour, batches, kind="weight", progress=False)[0]

    base = raw(refusal, refusal.batches(tok, "train", 8))
    if "plain" in which:
        for frac in (0.01, 0.05):
            for alpha in (1.0, 2.0, 4.0, 8.0):
                row("weight_attribution", base, frac, alpha)
    ctrl = raw(refusal, refusal.control_batches(tok, "train", 8))
    if "contrast" in which:
        for frac, alpha in ((0.01, 4.0), (0.01, 8.0), (0.02, 4.0), (0.05, 2.0), (0.05, 4.0)):
            row("contrast 1", base - ctrl, frac, alpha)
    util = raw(utility, utility.batches(tok, "train", 8))
    if "utility" in which:
        for lc, lu in ((1.0, 30.0), (1.0, 100.0), (2.0, 100.0)):
            for frac, alpha in ((0.02, 4.0), (0.05, 4.0), (0.05, 8.0)):
                row(f"contrast {lc:g}, utility {lu:g}", base - lc * ctrl + lu * util, frac, alpha)
    if "iterative" in which:
        it = iterative_scores(pair, refusal, budget=0.05, rounds=2, alpha=4.0, contrast=1.0, preserve=[utility],
                              preserve_weight=30.0, progress=False)
        for alpha in (4.0, 5.0, 6.0):
            row("iterative (2 rounds), contrast 1, utility 30", it, 0.05, alpha)
    if "rounds" in which:  # more re-scoring rounds, and the alpha the rounds are applied at
        for rounds, at in ((2, 4.0), (4, 4.0), (4, 6.0), (8, 6.0)):
            it = iterative_scores(pair, refusal, budget=0.05, rounds=rounds, alpha=at, contrast=1.0,
                                  preserve=[utility], preserve_weight=30.0, progress=False)
            for frac in (0.01, 0.025, 0.05):
                for alpha in (4.0, 6.0, 8.0):
                    row(f"iterative ({rounds} rounds at alpha {at:g}), contrast 1, utility 30", it, frac, alpha)


    if "weights" in which:  # how much contrast and utility preservation the refusal metric wants
        plain = NeuronScores(attribution_scores(pair, refusal, refusal.batches(tok, "train", 8), kind="activation",
                                                progress=False)[0], "attribution")
        for frac, alpha in ((0.025, 4.0), (0.05, 4.0), (0.05, 6.0)):
            row("attribution (activation, single pass)", plain, frac, alpha)
        for lc, lu in args.single:
            for frac, alpha in ((0.025, 4.0), (0.05, 4.0), (0.05, 6.0)):
                row(f"weight attribution, contrast {lc:g}, utility {lu:g}", base - lc * ctrl + lu * util, frac, alpha)
        for lc, lu in args.iterated:
            it = iterative_scores(pair, refusal, budget=0.05, rounds=8, alpha=6.0, contrast=lc, preserve=[utility],
                                  preserve_weight=lu, progress=False)
            for frac in (0.01, 0.025, 0.05):
                for alpha in (4.0, 6.0, 8.0):
                    row(f"iterative (8 rounds at alpha 6), contrast {lc:g}, utility {lu:g}", it, frac, alpha)


if __name__ == "__main__":
    main()
