"""Neuron cards one at a time against several in one pass (the report's cards stage), on the bundled model.

    python benchmarks/bench_cards.py [--cards 4] [--split test] [--repeats 2]

Prints the seconds of ``neuron_stats`` called once per neuron and of ``neurons_stats`` for all of
them (each model's forward pass over each prompt set shared; both stop after the deepest layer asked
for), their ratio, and whether the two give the same data. Both models are the bundled SmolLM2 loaded
twice: a card's cost is forward passes, which do not depend on the weights. Neurons are drawn at
random (seed 0) over every layer.
"""

from __future__ import annotations

import argparse
import time

import torch

from cnt_lens import BUNDLED_MODEL, ModelPair, Refusal, load_model
from cnt_lens.inspector import neuron_stats, neurons_stats


def main() -> None:
    """Time both ways, alternately, and print the medians and their ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cards", type=int, default=4)
    ap.add_argument("--split", default="test")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    pair = ModelPair(donor=load_model(BUNDLED_MODEL), target=load_model(BUNDLED_MODEL))
    flat = torch.randperm(pair.n_layers * pair.d_mlp, generator=torch.Generator().manual_seed(0))[:args.cards]
    neurons = [(int(i) // pair.d_mlp, int(i) % pair.d_mlp) for i in flat]
    behaviour = Refusal()
    single, together = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        one = [neuron_stats(pair, lay, n, behaviour, split=args.split) for lay, n in neurons]
        single.append(time.perf_counter() - t)
        t = time.perf_counter()
        many = neurons_stats(pair, neurons, behaviour, split=args.split)
        together.append(time.perf_counter() - t)
    a, b = sorted(single)[len(single) // 2], sorted(together)[len(together) // 2]
    n = len(behaviour.harmful.split(args.split)) + len(behaviour.harmless.split(args.split))
    print(f"{args.cards} cards on the {args.split} split ({n} prompts): "
          f"one at a time {a:.1f} s, in one pass {b:.1f} s, ratio {a / b:.2f}x; same data: {one == many}")


if __name__ == "__main__":
    main()
