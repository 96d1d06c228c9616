"""Score a finished refusal run's pair once more, with other settings, and save the ranking beside the run's own.

    CNT_LENS_CACHE=... python benchmarks/rank_into_run.py runs/demo --name whole_refusal_penalised
        [--method weight_attribution] [--objective continuation] [--contrast 0.5] [--utility-weight 10]
        [--rounds 0 --round-alpha 4 --budget 0.05]

Rebuilds the run's pair with the application's cached recipes (``metrics.json`` names the application and
model), scores every MLP neuron on the cross-distribution protocol's selection family (the bundled set's
train prompts: :data:`cnt_lens.experiments.applications.PROTOCOLS`), and writes
``RUN/scores/NAME.safetensors`` with the objective and settings in its metadata. ``benchmarks/budget_curves.py
RUN --methods NAME`` then reads the ranking on the held-out families at fixed budgets, beside the run's own.

``--objective continuation`` ranks on the log-probability of the donor's own refusal sentence (read on the same
train prompts), ``opening`` on the log-odds of a refusal opening; ``--contrast`` subtracts that × the same
estimate on the harmless train prompts; ``--utility-weight`` penalises each neuron's estimated harm to utility
NLL; ``--rounds R`` chooses ``--budget`` of the neurons in ``R`` re-scoring rounds at ``--round-alpha``
(:func:`cnt_lens.iterative_scores`). Nothing here reads a validation or test prompt.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cnt_lens import NeuronScores, Utility, iterative_scores, load_model, score
from cnt_lens.experiments.applications import APPLICATIONS, OBJECTIVES, PROTOCOLS
from cnt_lens.method.config import TransferConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--name", required=True, help="file stem of the ranking in RUN/scores/")
    ap.add_argument("--method", default="weight_attribution", choices=["weight_attribution", "attribution"])
    ap.add_argument("--objective", default="continuation", choices=sorted(OBJECTIVES))
    ap.add_argument("--contrast", type=float, default=0.0)
    ap.add_argument("--utility-weight", type=float, default=0.0)
    ap.add_argument("--rounds", type=int, default=0)
    ap.add_argument("--round-alpha", type=float, default=4.0)
    ap.add_argument("--budget", type=float, default=0.05, help="share of the neurons the rounds choose")
    args = ap.parse_args()
    path = args.run / "scores" / f"{args.name}.safetensors"
    if path.exists():
        raise SystemExit(f"{path} exists; choose another --name or delete it")
    extra = TransferConfig.from_dict(json.loads((args.run / "metrics.json").read_text())["extra"]["config"]).about
    app = APPLICATIONS[extra["application"]]
    pair = app.build(load_model(extra["model"]))
    behaviour = OBJECTIVES[args.objective](PROTOCOLS["cross"](app.behaviour()), getattr(pair, app.refuser))
    options = {"contrast": args.contrast}
    if args.utility_weight:
        options.update(preserve=[Utility()], preserve_weight=args.utility_weight)
    if args.rounds:
        ranked = iterative_scores(pair, behaviour, budget=args.budget, rounds=args.rounds, alpha=args.round_alpha,
                                  method=args.method, progress=False, **options)
    else:
        ranked = score(pair, behaviour, args.method, split="train", progress=False, **options)
    settings = {"objective": args.objective, "contrast": args.contrast, "utility_weight": args.utility_weight,
                "rounds": args.rounds, **({"round_alpha": args.round_alpha, "budget": args.budget}
                                          if args.rounds else {})}
    saved = NeuronScores(ranked.values, ranked.method, ranked.behaviour, ranked.n_prompts,
                         {**ranked.meta, **settings})
    path.parent.mkdir(parents=True, exist_ok=True)
    saved.save(path)
    print(f"wrote {path} ({settings})")


if __name__ == "__main__":
    main()
