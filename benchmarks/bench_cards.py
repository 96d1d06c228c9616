"""Neuron cards one at a time against several in one pass (the report's cards stage), on the bundled model.

    python benchmarks/bench_cards.py [--cards 4] [--split test] [--repeats 2]

Prints the seconds of three ways to compute ``--cards`` cards' data: ``neuron_stats`` once per neuron
with whole forward passes (how the report worked before ``neurons_stats``; emulated here by dropping
``stop_at_layer``), ``neuron_stats`` once per neuron (each pass stops after the neuron's layer), and
``neurons_stats`` for all of them (each model's pass over each prompt set shared, stopped after the
deepest layer asked for); the ratios to the last, and whether all three give the same data. Both models
are the bundled SmolLM2 loaded twice: a card's cost is forward passes, which do not depend on the
weights. Neurons are drawn at random (seed 0) over every layer.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from cnt_lens import BUNDLED_MODEL, ModelPair, Refusal, load_model
from cnt_lens.show.inspector import neuron_stats, neurons_stats


@contextmanager
def whole_passes(pair: ModelPair) -> Iterator[None]:
    """Both models run every block and the unembedding even when asked to stop early."""
    originals = {m: m.run_with_hooks for m in (pair.donor, pair.target)}

    def unstopped(run: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *a, stop_at_layer=None, **k: run(*a, **k)

    for m, run in originals.items():
        m.run_with_hooks = unstopped(run)
    try:
        yield
    finally:
        for m in originals:
            del m.run_with_hooks  # the instance attribute goes; the class's method is back


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    """Time the three ways in turn, ``--repeats`` times, and print the medians and their ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cards", type=int, default=4)
    ap.add_argument("--split", default="test")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    pair = ModelPair(donor=load_model(BUNDLED_MODEL), target=load_model(BUNDLED_MODEL))
    flat = torch.randperm(pair.n_layers * pair.d_mlp, generator=torch.Generator().manual_seed(0))[:args.cards]
    neurons = [(int(i) // pair.d_mlp, int(i) % pair.d_mlp) for i in flat]
    behaviour = Refusal()

    def one_at_a_time() -> list[dict[str, Any]]:
        return [neuron_stats(pair, lay, n, behaviour, split=args.split) for lay, n in neurons]

    def whole() -> list[dict[str, Any]]:
        with whole_passes(pair):
            return one_at_a_time()

    ways = {"one at a time, whole passes": whole, "one at a time, stopped": one_at_a_time,
            "in one pass, stopped": lambda: neurons_stats(pair, neurons, behaviour, split=args.split)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    data = {}
    for _ in range(args.repeats):
        for name, fn in ways.items():
            seconds, data[name] = _timed(fn)
            times[name].append(seconds)
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    n = len(behaviour.harmful.split(args.split)) + len(behaviour.harmless.split(args.split))
    print(f"{args.cards} cards {neurons} on the {args.split} split ({n} prompts), median of {args.repeats}:")
    last = median["in one pass, stopped"]
    for name, seconds in median.items():
        print(f"  {name:30s} {seconds:8.1f} s  {seconds / last:5.2f}x")
    print(f"  same data: {len({repr(d) for d in data.values()}) == 1}")


if __name__ == "__main__":
    main()
