"""How strong must ``recipes.bias_tune`` be to give bias removal a measurable gap?

    python benchmarks/explore_bias_tune.py [--device cuda]     (~10 min on 2 cores, ~1 min on one H100)

Tunes the bundled SmolLM2 toward the stereotyped side of the bias **train** pairs at a few
strengths and prints, per strength, the **validation** stereotype score, log-prob gap and utility
NLL (one JSON line each). The recipe's default is the weakest setting whose held-out gap to the
base model is large enough to measure a removal on.
"""

from __future__ import annotations

import argparse
import json

from cnt_lens import StereotypeBias, Utility, load_model, measure
from cnt_lens.recipes import TuneConfig, bias_tune


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default=None)
    base = load_model("smollm2-135m-instruct", device=p.parse_args().device)
    behaviours = [StereotypeBias(), Utility()]
    print(json.dumps({"steps": 0, "lr": 0, **measure(base, behaviours, "validation", batch_size=32)}), flush=True)
    for steps, lr in ((40, 5e-5), (80, 1e-4), (120, 1e-4), (120, 2e-4)):
        tuned = bias_tune(base, config=TuneConfig(steps=steps, lr=lr))
        print(json.dumps({"steps": steps, "lr": lr, **measure(tuned, behaviours, "validation", batch_size=32)}),
              flush=True)


if __name__ == "__main__":
    main()
