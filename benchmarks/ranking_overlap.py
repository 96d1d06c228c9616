"""How differently the scoring methods rank neurons: overlap of each method's top 1% with attribution's.

    python benchmarks/ranking_overlap.py runs/demo [--fraction 0.01] [--reference attribution]

Reads the ``scores/*.safetensors`` a ``cnt-lens demo`` (or ``run``) wrote and prints a markdown table.
Importance baselines whose sign is meaningless (wanda, snip, activation_contrast, weight_diff,
nlsr_drift, random) are ranked by value, as the pipeline does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cnt_lens import NeuronScores


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--reference", default="attribution")
    a = p.parse_args()
    scores = {f.stem: NeuronScores.load(f) for f in sorted((a.run_dir / "scores").glob("*.safetensors"))}
    ref = scores[a.reference].top_fraction(a.fraction)
    print(f"| method | top {a.fraction:.0%} overlap with {a.reference} | layers holding half its picks |")
    print("|---|---|---|")
    for name, s in scores.items():
        sel = s.top_fraction(a.fraction)
        counts = sorted(sel.per_layer(), reverse=True)
        total, n_layers = 0, 0
        for c in counts:
            if total >= sel.n / 2:
                break
            total += c
            n_layers += 1
        print(f"| {name} | {sel.overlap(ref):.3f} | {n_layers} |")


if __name__ == "__main__":
    main()
