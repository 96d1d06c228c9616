"""How strong must ``recipes.bias_tune`` be to give bias removal a measurable gap?

    python benchmarks/explore_bias_tune.py [--pairs bias_templates|bias_pairs] [--device cuda]
    (~10 min on 2 cores, ~1 min on one H100)

Tunes the bundled SmolLM2 toward the stereotyped side of the bias **train** pairs (pairwise
preference objective) at a few strengths and prints, per strength, the **train** and **validation**
stereotype score, log-prob gap and utility NLL (one JSON line each). The recipe's default is the weakest setting whose held-out gap to the
base model is large enough to measure a removal on.
"""

from __future__ import annotations

import argparse
import json

from cnt_lens import StereotypeBias, Utility, load_model, load_prompts, measure
from cnt_lens.experiments.recipes import TuneConfig, bias_tune


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default=None)
    p.add_argument("--pairs", default="bias_templates", choices=["bias_templates", "bias_pairs"])
    p.add_argument("--strengths", default="30:3e-5,60:3e-5,60:1e-4,120:1e-4", help="steps:lr,...")
    args = p.parse_args()
    base = load_model("smollm2-135m-instruct", device=args.device)
    pairs = load_prompts(args.pairs)
    behaviours = [StereotypeBias(pairs=pairs), Utility()]
    def show(model, steps: int, lr: float) -> None:
        for split in ("train", "validation"):
            print(json.dumps({"pairs": args.pairs, "steps": steps, "lr": lr, "split": split,
                              **measure(model, behaviours, split, batch_size=32)}), flush=True)

    show(base, 0, 0.0)
    for item in args.strengths.split(","):
        steps, lr = int(item.split(":")[0]), float(item.split(":")[1])
        show(bias_tune(base, pairs=pairs, config=TuneConfig(steps=steps, lr=lr)), steps, lr)


if __name__ == "__main__":
    main()
