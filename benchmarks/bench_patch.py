"""apply + revert of a 1% patch on the bundled model, with the finiteness check before and after it was made cheap.

    python benchmarks/bench_patch.py [--fraction 0.01] [--repeats 50] [--rounds 4]

``NeuronPatch.apply`` refuses a transplant whose written values are not all finite. The check used to
be ``isfinite(t).all()`` per written tensor (two reductions each, ~90 tensors for SmolLM2); it is
now one float64 sum per tensor and one check of the sums (``transplant._require_finite``). This
prints the minimum and median milliseconds of apply + revert with each check, alternately for
``--rounds`` rounds of ``--repeats`` (same process, same patch), so machine noise hits both.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch

import cnt_lens.method.transplant as transplant
from cnt_lens import BUNDLED_MODEL, ModelPair, NeuronPatch, NeuronScores, load_model


def per_tensor_check(written: list[tuple[int, str, torch.Tensor]], alpha: float) -> None:
    """The previous check: ``isfinite(t).all()`` for every written tensor, then one stack."""
    flags = [torch.isfinite(t).all() for _, _, t in written]
    if flags and not bool(torch.stack(flags).all()):
        raise ValueError(f"the transplant at alpha {alpha} gives non-finite weights")


def _timed(patch: NeuronPatch, model: Any, check: Callable[..., None], repeats: int) -> tuple[float, float]:
    transplant._require_finite = check
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        patch.apply(model)
        patch.revert(model)
        times.append(time.perf_counter() - t)
    times.sort()
    return 1000 * times[0], 1000 * times[len(times) // 2]


def main() -> None:
    """Alternate the two checks and print each round's minimum and median, then the medians' ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    pair = ModelPair(donor=load_model(BUNDLED_MODEL), target=load_model(BUNDLED_MODEL))
    ranks = torch.rand(pair.n_layers, pair.d_mlp, generator=torch.Generator().manual_seed(0))
    sel = NeuronScores(ranks, method="random").top_k(int(args.fraction * pair.n_layers * pair.d_mlp))
    patch = NeuronPatch.from_pair(pair, sel, alpha=2.0)
    checks = {"per-tensor isfinite": per_tensor_check, "float64 sums": transplant._require_finite}
    medians: dict[str, list[float]] = {name: [] for name in checks}
    try:
        for r in range(args.rounds):
            for name, check in checks.items():
                low, mid = _timed(patch, pair.target, check, args.repeats)
                medians[name].append(mid)
                print(f"round {r + 1}  {name:20s} min {low:6.2f} ms  median {mid:6.2f} ms")
    finally:
        transplant._require_finite = checks["float64 sums"]
    before, after = (sorted(m)[len(m) // 2] for m in medians.values())
    print(f"{sel.n} neurons: median of the rounds' medians {before:.2f} ms -> {after:.2f} ms ({before / after:.2f}x)")


if __name__ == "__main__":
    main()
