"""Refusal rates of a run directory, recounted from ``items.jsonl``, each with its n and a Wilson 95% interval.

    python benchmarks/refusal_rates.py runs/demo [--examples 3]

One line per model (target, donor, patched) and prompt set (harmful, harmless), from the per-prompt verdicts the
rates in ``metrics.json`` were counted from; ``--examples N`` also prints N harmful-prompt responses per model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cnt_lens.method.evaluate import wilson_interval


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--examples", type=int, default=0)
    args = ap.parse_args()
    items = [json.loads(line) for line in (args.run / "items.jsonl").read_text().splitlines()]
    refusal = [i for i in items if i.get("behaviour") == "refusal"]
    for model in ("target", "donor", "patched"):
        for kind in ("harmful", "harmless"):
            verdicts = [i["refused"] for i in refusal if i["model"] == model and i["set"] == kind]
            k, n = sum(verdicts), len(verdicts)
            lo, hi = wilson_interval(k, n)
            print(f"{model:>8} refusal_{kind:<8} {k:>3}/{n:<3} = {k / n:.3f}  [{lo:.2f}, {hi:.2f}]")
    for model in ("target", "donor", "patched") if args.examples else ():
        for i in [i for i in refusal if i["model"] == model and i["set"] == "harmful"][: args.examples]:
            print(f"{model:>8} | {i['prompt'][:60]!r} -> {i['response'][:110]!r} [{i['judge']}]")


if __name__ == "__main__":
    main()
