"""Does choosing neurons on more than one prompt family carry the donor's refusal further out of distribution?

    CNT_LENS_CACHE=... python benchmarks/selection_families.py [--ks 461,922] [--alpha 4] [--per-family 96]
        [--rankings bundled,pooled,worst_family] [--held-out roleplay,writing,context] [--out selection_families.jsonl]

The enhance application's pair (SmolLM2 ← its cached safety tune); every ranking is one pass of weight
attribution on the log-probability of the donor's own refusal sentence (``--objective continuation``),
no re-scoring rounds, no utility penalty — the setting of ``benchmarks/objective_ood.py``. What changes is
the prompts the neurons are scored on:

* ``bundled``: the bundled set's train prompts (the cross protocol's default selection family);
* ``pooled``: those and the first ``--per-family`` train prompts of AdvBench, scored together (one mean);
* ``worst_family``: each family scored alone, each score divided by that family's donor–target metric
  gap, and a neuron's score the *smaller* of the two — it ranks high only if copying it moves both
  families toward the donor;
* ``framed``: the bundled train prompts pooled with the train prompts of every framed family *not* in
  ``--held-out`` (leave-one-framing-out: ``--held-out writing`` scores on role-play and backstory requests);
* ``balanced``: the same families each scored alone, and a neuron's score the mean of the families' scores
  (each family weighs the same, however many prompts it has).

Each ranking's top ``k`` for each of ``--ks`` is transplanted at ``--alpha`` and evaluated on the
``--held-out`` framed families only (all their prompts; by default all three, role-play, writing and
backstory, which no ranking but ``framed`` sees) with their harmless twins for over-refusal, and utility
NLL; target and donor the same way. Points are fixed before any evaluation; nothing is chosen from them.
One JSON line per model and point.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import replace
from pathlib import Path

import torch

from cnt_lens import NeuronPatch, NeuronScores, Refusal, Utility, load_model, load_prompts, measure, score
from cnt_lens.behaviours import donor_refusal
from cnt_lens.core.files import append_jsonl
from cnt_lens.data import cross_harmful, cross_harmless
from cnt_lens.experiments.applications import APPLICATIONS
from cnt_lens.models import BUNDLED_MODEL

FRAMINGS = ("roleplay", "writing", "context")


def family_train(behaviour: Refusal, family: str, n: int | None) -> Refusal:
    """``behaviour`` scored on the first ``n`` train prompts of one harmful ``family``."""
    harmful = behaviour.harmful.filter(lambda r: r["family"] == family and r["split"] == "train", family)
    return replace(behaviour, harmful=harmful.take(n) if n else harmful)


def worst_family(scores: list[NeuronScores]) -> NeuronScores:
    """Per neuron, the smallest of the families' scores, each in units of its family's metric gap."""
    gaps = [abs(s.meta["metric_donor"] - s.meta["metric_target"]) for s in scores]
    values = torch.stack([s.values / g for s, g in zip(scores, gaps)]).amin(dim=0)
    return NeuronScores(values, "worst_family", scores[0].behaviour, sum(s.n_prompts for s in scores),
                        {"families": [s.meta.get("family") for s in scores], "gaps": gaps})


def family_scores(pair, behaviour: Refusal, family: str, records=None) -> NeuronScores:
    """One weight-attribution pass of ``behaviour`` (on ``records`` when given), labelled with ``family``."""
    if records is not None:
        behaviour = replace(behaviour, harmful=replace(behaviour.harmful, name=family, records=tuple(records)))
    s = score(pair, behaviour, "weight_attribution", split="train", progress=False)
    s.meta["family"] = family
    return s


def ranking(name: str, pair, objective: Refusal, per_family: dict[str, Refusal], held: list[str]) -> NeuronScores:
    """The ranking ``name`` (see the module docstring) of the pair's neurons."""
    bundled = per_family["cnt_lens"]
    framed = load_prompts("harmful_framed").filter(lambda r: r["family"] not in held and r["split"] == "train",
                                                   "framed_train")
    if name == "bundled":
        return family_scores(pair, bundled, "cnt_lens")
    if name == "pooled":
        return family_scores(pair, objective, "pooled", bundled.harmful.records + per_family["advbench"].harmful.records)
    if name == "worst_family":
        return worst_family([family_scores(pair, b, f) for f, b in per_family.items()])
    if name == "framed":
        return family_scores(pair, objective, "framed", bundled.harmful.records + framed.records)
    if name == "balanced":
        parts = [family_scores(pair, bundled, "cnt_lens")] + [
            family_scores(pair, objective, f, [r for r in framed if r["family"] == f])
            for f in sorted({r["family"] for r in framed})]
        values = torch.stack([s.values for s in parts]).mean(dim=0)
        return NeuronScores(values, "balanced", parts[0].behaviour, sum(s.n_prompts for s in parts),
                            {"families": [s.meta["family"] for s in parts]})
    raise ValueError(f"unknown ranking {name!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=BUNDLED_MODEL)
    ap.add_argument("--ks", default="461,922", help="neuron budgets (comma-separated)")
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--per-family", type=int, default=96, help="AdvBench train prompts scored (bundled: all 96)")
    ap.add_argument("--rankings", default="bundled,pooled,worst_family")
    ap.add_argument("--held-out", default=",".join(FRAMINGS), help="framed families evaluated (and not scored on)")
    ap.add_argument("--no-reference", action="store_true", help="skip the target's and donor's rows")
    ap.add_argument("--out", type=Path, default=None, help="also append the lines to this JSONL file")
    args = ap.parse_args()
    pair = APPLICATIONS["enhance"].build(load_model(args.model))
    both = Refusal(harmful=cross_harmful(select=("cnt_lens", "advbench")), harmless=cross_harmless())
    own = donor_refusal(pair.donor, family_train(both, "cnt_lens", None), "train", progress=False)
    objective = replace(both, continuation=own)
    held = args.held_out.split(",")
    unknown = sorted(set(held) - set(FRAMINGS))
    if unknown:
        ap.error(f"--held-out: unknown framed families {unknown}; they are {list(FRAMINGS)}")
    keep = lambda r: r["family"] in held  # noqa: E731  (the cross protocol puts every framed prompt in test)
    held_out = replace(both, harmful=both.harmful.filter(keep, "held_out"),
                       harmless=both.harmless.filter(keep, "held_out"))
    behaviours = [held_out, Utility()]

    def evaluate(label: dict, model, edit=contextlib.nullcontext()) -> None:
        """Measure ``model`` (inside ``edit``) and print the row (appended to ``--out`` when given)."""
        with edit:
            row = {"donor_refusal": own, **label, **measure(model, behaviours, "test", batch_size=32)}
        print(append_jsonl(args.out, row) if args.out else json.dumps(row, default=float), flush=True)

    if not args.no_reference:
        evaluate({"model": "target"}, pair.target)
        evaluate({"model": "donor"}, pair.donor)
    per_family = {f: family_train(objective, f, None if f == "cnt_lens" else args.per_family)
                  for f in ("cnt_lens", "advbench")}

    for name in args.rankings.split(","):
        scores = ranking(name, pair, objective, per_family, held)
        for k in (int(x) for x in args.ks.split(",")):
            patch = NeuronPatch.from_pair(pair, scores.top_k(k), alpha=args.alpha)
            evaluate({"model": "patched", "ranking": name, "held_out": held, "k": k, "alpha": args.alpha,
                      "per_layer": patch.selection.per_layer()}, pair.target, patch.applied(pair.target))


if __name__ == "__main__":
    main()
