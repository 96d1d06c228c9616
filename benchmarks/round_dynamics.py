"""How a run's re-scoring rounds move, and what fixing their direction would change (train and validation only).

    CNT_LENS_CACHE=... python benchmarks/round_dynamics.py runs/demo --out runs/rounds [--fixed] [--search]

Rebuilds the run's pair with the application's cached recipes (``metrics.json`` names the application, model,
protocol and objective) and re-scores its main ranking in rounds with the run's own settings
(:func:`cnt_lens.iterative_scores`). Prints, per round, the target's mean metric on train as the rounds before
patched it and how many of the next picks the round shares with the round one before (what ``--stop-overlap``
reads) and two before. ``--fixed`` ranks a second time with the behaviour's ``toward`` set to the first round's
direction, so no round turns against the donor once the target passes its metric. ``--search`` runs the
validation search (:func:`cnt_lens.search_minimal`, the run's settings and constraint) on each ranking and prints
the point the run would choose: the minimal set, or the best acceptable point evaluated in full. No test prompt is
read. ``--out`` holds the resume store, so a second call reuses every scoring pass and evaluation.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from run_pair import rebuilt  # this directory's sibling module

import cnt_lens.method.rounds as rounds_module
from cnt_lens import NeuronScores, iterative_scores, search_minimal
from cnt_lens.method.resume import resumable
from cnt_lens.method.rounds import next_overlap
from cnt_lens.method.search import measure_reference
from cnt_lens.method.selection import NeuronSelection
from cnt_lens.workflow.pipeline import best_point


def ranked_in_rounds(pair, behaviour, config, side_effects):  # noqa: ANN001, ANN201
    """The run's main ranking, and each round's own scoring pass (in order)."""
    passes: list[NeuronScores] = []
    real = rounds_module.score

    def kept(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        passes.append(real(*args, **kwargs))
        return passes[-1]

    ranking = config.ranking
    weights = ranking.preserve_weights if ranking.preserve_weights is not None else (10.0,) * len(side_effects)
    preserved = [(b, w) for b, w in zip(side_effects, weights) if w]
    rounds_module.score = kept  # watch each round's pass; the ranking is computed exactly as a run does
    try:
        scores = iterative_scores(pair, behaviour, budget=config.search.max_fraction, rounds=ranking.rounds,
                                  alpha=ranking.round_alpha, method=ranking.method, progress=False,
                                  contrast=ranking.contrast, preserve=[b for b, _ in preserved],
                                  preserve_weight=[w for _, w in preserved], batch_size=ranking.batch_size)
    finally:
        rounds_module.score = real
    return scores, passes


def print_rounds(name: str, pair, scores: NeuronScores, passes: list[NeuronScores]) -> None:  # noqa: ANN001
    """Per round: the metric it read and its next picks' overlap with the rounds one and two before."""
    history, total = scores.meta["history"], round(scores.meta["budget"] * pair.n_neurons)
    per_round = max(1, round(total / scores.meta["rounds"]))
    order = scores.ranked().flatten().argsort(descending=True)
    print(f"\n{name}: round, target metric (train), overlap with round t-1, with round t-2")
    for t, past in enumerate(passes):
        picked = torch.zeros(pair.n_neurons, dtype=torch.bool).index_fill(0, order[: per_round * t], True)
        chosen = NeuronSelection(picked.view(pair.n_layers, pair.d_mlp))  # the rounds before t
        laps = [next_overlap(passes[t - back], past, chosen, total - chosen.n) if t >= back else None for back in (1, 2)]
        print(f"  {t + 1}  {history[t]['metric_target']:8.3f}  "
              + "  ".join("   -  " if o is None else f"{o:6.3f}" for o in laps))


def chosen_point(pair, behaviour, scores, config, app, reference):  # noqa: ANN001, ANN201
    """The point the run's search would choose on validation (the best acceptable evaluated one when none is minimal)."""
    result = search_minimal(pair, behaviour, scores, config.search, side_effects=app.side_effects(),
                            constraint=app.constraint, reference=reference, progress=False)
    evaluated = [p for p in result.frontier if p.measured != "estimate"]
    return best_point(evaluated, result.reference, behaviour)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="resume store of these passes (not the run's own)")
    ap.add_argument("--fixed", action="store_true", help="also rank with the first round's direction fixed")
    ap.add_argument("--search", action="store_true", help="the validation search on each ranking")
    args = ap.parse_args()
    with resumable(args.out):
        _, config, app, pair, behaviour = rebuilt(args.run)
        rankings = {"the metric's own direction (as runs rank)": ranked_in_rounds(pair, behaviour, config,
                                                                                 app.side_effects())}
        first = next(iter(rankings.values()))[1][0].meta
        print(f"donor's mean metric on train: {first['metric_donor']:.3f}")
        if args.fixed:
            oriented = replace(behaviour, toward=1.0 if first["metric_donor"] >= first["metric_target"] else -1.0)
            rankings["direction fixed to the first round's"] = ranked_in_rounds(pair, oriented, config,
                                                                                app.side_effects())
        reference = measure_reference(pair, behaviour, app.side_effects(), split=config.search.split,
                                      batch_size=config.search.batch_size) if args.search else None
        for name, (scores, passes) in rankings.items():
            print_rounds(name, pair, scores, passes)
            if reference is not None:
                p = chosen_point(pair, behaviour, scores, config, app, reference)
                print(f"  validation choice: {p.k} neurons, alpha {p.alpha:g}, gap closed {p.gap_closed:.3f}, "
                      f"harmful {p.numbers['refusal_harmful']:.3f}, harmless {p.numbers['refusal_harmless']:.3f}, "
                      f"first-token KL {p.numbers.get('kl_first_token', float('nan')):.3f}, acceptable {p.acceptable}")

if __name__ == "__main__":
    main()
