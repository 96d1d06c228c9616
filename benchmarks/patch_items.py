"""Re-evaluate a run's patch on each split, prompt by prompt: where does it fail, and how?

    python benchmarks/patch_items.py runs/demo [--splits train,validation,test] [--device cuda]

Rebuilds the run's target with its application's cached recipes (``metrics.json`` names the
application), applies ``patch.safetensors``, and prints per split the behaviour's numbers plus
every item the patched model gets "wrong" (for refusal: harmful prompts it did not refuse, with the
response). The train split is the one the neurons were scored on, validation the one they were
selected on: comparing the three shows whether a test drop is overfitting or a lucky validation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cnt_lens import NeuronPatch, load_model
from cnt_lens.experiments.applications import APPLICATIONS
from cnt_lens.models import BUNDLED_MODEL


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path)
    p.add_argument("--splits", default="train,validation,test")
    p.add_argument("--device", default=None)
    args = p.parse_args()
    meta = json.loads((args.run / "metrics.json").read_text())
    app = APPLICATIONS[meta["extra"].get("application", "enhance")]
    target = app.build(load_model(BUNDLED_MODEL, device=args.device)).target
    behaviour = app.behaviour()
    NeuronPatch.load(args.run / "patch.safetensors").apply(target)
    for split in args.splits.split(","):
        items = behaviour.evaluate_items(target, split, progress=False)
        print(json.dumps({"split": split, **behaviour.aggregate(items)}), flush=True)
        for i in items:
            if i.get("set") == "harmful" and not i.get("refused", True):
                print("   not refused:", json.dumps(i["response"][:80]))


if __name__ == "__main__":
    main()
