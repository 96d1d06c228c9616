"""Refusal rates from whole answers and from answers generated only until their verdict is decided.

    CNT_LENS_CACHE=… python benchmarks/bench_generation.py [--split test] [--patch RUN/patch.safetensors]
        [--batch-size 32] [--rounds 1]

The demo's pair (the bundled SmolLM2 and its cached safety tune; the tune is trained first if the cache
lacks it) and, with ``--patch``, the target with a run's patch applied. For each model, ``Refusal``'s
evaluation on ``--split`` (harmful then harmless prompts, 48 new tokens, judged) two ways, alternately
for ``--rounds`` rounds so machine noise hits both: ``evaluate_items`` (every answer whole: what a run
keeps in ``items.jsonl``) and ``decided_items`` (each answer stops once ``verdict_is_final`` holds and
leaves the batch: what searches, baselines and random seeds use). Prints seconds, the ratio, how many
verdicts agree (they must all) and the mean generated length both ways.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from cnt_lens import BUNDLED_MODEL, ModelPair, NeuronPatch, Refusal, load_model
from cnt_lens.experiments.recipes import safety_tune


def _timed(run: Any) -> tuple[list[dict[str, Any]], float]:
    t = time.perf_counter()
    items = run()
    return items, time.perf_counter() - t


def main() -> None:
    """Time both ways per model and print one row each, then the total ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="test")
    ap.add_argument("--patch", default=None, help="a run's patch.safetensors: also the target with it applied")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    base = load_model(BUNDLED_MODEL)
    pair = ModelPair(donor=safety_tune(base), target=base)
    behaviour = Refusal()
    models: dict[str, tuple[Any, NeuronPatch | None]] = {"target": (pair.target, None), "donor": (pair.donor, None)}
    if args.patch:
        models["patched"] = (pair.target, NeuronPatch.load(args.patch))
    kw = dict(batch_size=args.batch_size, progress=False)
    totals = {"whole": 0.0, "decided": 0.0}
    print("| model | n | whole answers, s | decided, s | ratio | verdicts agree | mean chars whole / decided |")
    print("|---|---|---|---|---|---|---|")
    for name, (model, patch) in models.items():
        times: dict[str, list[float]] = {"whole": [], "decided": []}
        for _ in range(args.rounds):
            if patch is not None:
                patch.apply(model)
            try:
                whole, t_whole = _timed(lambda: behaviour.evaluate_items(model, args.split, **kw))
                decided, t_decided = _timed(lambda: behaviour.decided_items(model, args.split, **kw))
            finally:
                if patch is not None:
                    patch.revert(model)
            times["whole"].append(t_whole)
            times["decided"].append(t_decided)
        agree = sum(w["refused"] == d["refused"] for w, d in zip(whole, decided))
        chars = [statistics.mean(len(i["response"]) for i in items) for items in (whole, decided)]
        mid = {k: statistics.median(v) for k, v in times.items()}
        totals = {k: totals[k] + mid[k] for k in totals}
        print(f"| {name} | {len(whole)} | {mid['whole']:.1f} | {mid['decided']:.1f} | "
              f"{mid['whole'] / mid['decided']:.2f}× | {agree}/{len(whole)} | {chars[0]:.0f} / {chars[1]:.0f} |",
              flush=True)
    print(f"all models: {totals['whole']:.1f} s whole, {totals['decided']:.1f} s decided, "
          f"{totals['whole'] / totals['decided']:.2f}×")


if __name__ == "__main__":
    main()
