"""Neuron transfer's trade-off in the field's units, on validation: refusals per 100 against first-token KL per (k, α).

    CNT_LENS_CACHE=… python benchmarks/kl_front.py RUN [--fractions 0.0025,0.005,0.01,0.02,0.04]
        [--alphas 1,2,4,8] [--out RUN/kl_front.json]

Rebuilds the pair of a finished ``cnt-lens run`` (its application and model, from ``metrics.json``), loads its main
ranking from ``scores/``, and for every budget (fraction of all MLP neurons, top of the ranking as the search takes
it) and α measures the patched target on **validation** as the search does (the greedy-opening estimate of refusal
on harmful and harmless prompts, utility NLL) plus first-token KL(target ‖ patched) on the harmless validation
prompts. The constraint is read against the target's and donor's estimates on the same prompts. Prints every point, the points no other beats on both refusal and KL (the front, by the application's
direction of refusal), and whether the application's constraint holds; writes them to ``--out``. Chooses nothing and
reads no test prompt: it shows what a KL-aware search could pick from the same ranking.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from run_pair import rebuilt  # a sibling benchmark module

from cnt_lens import NeuronPatch, NeuronScores, Utility, measure
from cnt_lens.core.files import atomic_write_text
from cnt_lens.method.divergence import KL_NAME, first_token_kl, next_token_logprobs
from cnt_lens.method.pareto import nondominated


def front(points: list[dict], sign: int) -> list[dict]:
    """Points no other point beats on both refusal (``sign`` 1: more is better, -1: less) and KL, by KL."""
    return sorted(nondominated(points, lambda p: (p["kl"], -sign * p["per_100"])), key=lambda p: p["kl"])


def main() -> None:
    """Measure every (budget, α) on validation, print the table and the front, write them."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--fractions", default="0.0025,0.005,0.01,0.02,0.04")
    ap.add_argument("--alphas", default="1,2,4,8")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    t0 = time.time()
    metrics, _, app, pair, behaviour = rebuilt(args.run)  # the run's pair and prompts
    scores = NeuronScores.load(args.run / "scores" / f"{metrics['patched']['method']}.safetensors")
    batches = behaviour.kl_batches(pair.tokenizer, "validation", args.batch_size)
    unedited = next_token_logprobs(pair.target, batches)
    estimates = {m: measure(getattr(pair, m), [behaviour, Utility()], "validation", batch_size=args.batch_size,
                            estimate=True) for m in ("target", "donor")}
    sign = 1 if estimates["donor"]["refusal_harmful"] > estimates["target"]["refusal_harmful"] else -1
    for m in ("target", "donor"):
        print(f"{m}: refusal {100 * estimates[m]['refusal_harmful']:.1f} per 100 "
              f"(n={estimates[m]['refusal_harmful_n']}), harmless {100 * estimates[m]['refusal_harmless']:.1f}, "
              f"NLL {estimates[m]['utility_nll']:.3f}", flush=True)
    points = []
    for fraction in (float(f) for f in args.fractions.split(",")):
        selection = scores.top_k(max(1, round(fraction * pair.n_neurons)))
        for alpha in (float(a) for a in args.alphas.split(",")):
            with NeuronPatch.from_pair(pair, selection, alpha).applied(pair.target):
                m = measure(pair.target, [behaviour, Utility()], "validation", batch_size=args.batch_size,
                            estimate=True)
                kl = first_token_kl(pair.target, unedited, batches)
            p = {"k": selection.n, "fraction": fraction, "alpha": alpha, "per_100": 100 * m["refusal_harmful"],
                 "n": m["refusal_harmful_n"], "harmless_per_100": 100 * m["refusal_harmless"],
                 "utility_nll": m["utility_nll"], "kl": kl[KL_NAME], "kl_ci95": kl[f"{KL_NAME}_ci95"],
                 "acceptable": bool(app.constraint(m, estimates))}
            points.append(p)
            print(f"k {p['k']:5d} ({100 * fraction:.2f}%) alpha {alpha:g}: refusal {p['per_100']:5.1f} per 100 "
                  f"(n={p['n']}), harmless {p['harmless_per_100']:5.1f}, NLL {p['utility_nll']:.3f}, "
                  f"KL {p['kl']:.3f}{'' if p['acceptable'] else ' (constraint fails)'}", flush=True)
    best = front(points, sign)
    print("front (validation; no point beats these on both refusal and KL):")
    for p in best:
        print(f"  k {p['k']} alpha {p['alpha']:g}: {p['per_100']:.1f} per 100 at KL {p['kl']:.3f}"
              f"{'' if p['acceptable'] else ' (constraint fails)'}")
    out = args.out or args.run / "kl_front.json"
    atomic_write_text(out, json.dumps({"run": str(args.run), "split": "validation", "estimates": estimates,
                               "points": points, "front": best, "wall_time_s": round(time.time() - t0, 1)},
                              indent=1))
    print(f"wrote {out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
