"""What the generation check costs: one evaluation's seconds with the check on four rows, on every row, and off.

    python benchmarks/bench_verify.py [--split validation] [--batch-size 32] [--rounds 2] [--model donor]

``generate`` checks the first batch of every call against the bridge's teacher-forced forward pass
(``verify_greedy``). It now reads four of the batch's rows (the padding and answer-length extremes) and
unembeds only the generated positions; before, it read every row and unembedded every position. On a
split of one or two batches per prompt set (validation: 32 harmful and 30 harmless prompts), every batch
is a first batch, so that check was about as costly as the generation itself. For each of ``Refusal``'s
three ways of evaluating (the search's 12-token estimate, answers cut where their verdict is decided,
whole answers), the three settings run alternately for ``--rounds`` rounds; prints the median seconds,
each setting's ratio to no check, and whether the verdicts agree.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import cnt_lens.behaviours.generation as bh
from cnt_lens import BUNDLED_MODEL, ModelPair, Refusal, load_model

SETTINGS = {"four rows": 4, "every row (before)": None, "off": 0}


def _run(model, way: str, split: str, batch_size: int, rows: int | None) -> tuple[list, float]:
    """One evaluation with the check on ``rows`` rows (0: off); its records and seconds."""
    real_verify = bh.verify_greedy
    bh.verify_greedy = (lambda *args, **kwargs: None) if rows == 0 else functools.partial(real_verify, rows=rows)
    try:
        behaviour = Refusal()
        fn = {"estimate": behaviour.estimate_items, "decided": behaviour.decided_items,
              "whole": behaviour.evaluate_items}[way]
        t = time.perf_counter()
        items = fn(model, split, batch_size=batch_size, progress=False)
        return items, time.perf_counter() - t
    finally:
        bh.verify_greedy = real_verify


def main() -> None:
    """One table row per way of evaluating."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="validation")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", choices=("target", "donor"), default="target",
                    help="the bundled SmolLM2 (target) or its cached safety tune (donor; trained first if not cached)")
    args = ap.parse_args()
    model = load_model(BUNDLED_MODEL)
    if args.model == "donor":
        from cnt_lens.experiments.recipes import safety_tune

        model = ModelPair(donor=safety_tune(model), target=model).donor
    print(f"| way ({args.model}, {args.split}) | " + " | ".join(f"{s}, s" for s in SETTINGS)
          + " | four rows ÷ off | every row ÷ off | verdicts agree |")
    print("|---|" + "---|" * (len(SETTINGS) + 3))
    for way in ("estimate", "decided", "whole"):
        times: dict[str, list[float]] = {s: [] for s in SETTINGS}
        verdicts = set()
        for _ in range(args.rounds):
            for name, rows in SETTINGS.items():
                items, sec = _run(model, way, args.split, args.batch_size, rows)
                times[name].append(sec)
                verdicts.add(tuple(i["refused"] for i in items))
        mid = {k: statistics.median(v) for k, v in times.items()}
        off = mid["off"]
        print(f"| {way} | " + " | ".join(f"{mid[s]:.1f}" for s in SETTINGS)
              + f" | {mid['four rows'] / off:.2f} | {mid['every row (before)'] / off:.2f} | "
              f"{'yes' if len(verdicts) == 1 else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
