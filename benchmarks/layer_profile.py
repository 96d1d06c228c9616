"""Does scaling a transplant's alpha per layer (heretic's kernel over layers) buy a lower first-token KL? Validation only.

    CNT_LENS_CACHE=... python benchmarks/layer_profile.py runs/disalign --out runs/profile [--k 602] [--trials 30]

Rebuilds the run's pair (``metrics.json`` names the application, model, protocol and objective), loads its main
ranking, and evaluates on validation, in full (the judge on whole answers; first-token KL on the harmless prompts),
the top ``--k`` neurons (default: the run's own set) with the alpha of layer ``l`` scaled by ``w(l)``: 1 at layer
``p·(L−1)``, falling linearly to ``m`` at distance ``d·(L−1)`` and beyond (heretic's ablation-weight kernel), for a
grid of profiles at alpha 8 and 10. ``--trials N`` adds an Optuna Gaussian-process search over k, alpha and
``(p, d, m)`` on the screened estimates, as ``--search pareto`` searches k and alpha (objectives: gap left open,
first-token KL, neurons; feasible: within ``slack`` of the goal and acceptable), whose ``--confirm`` lowest-KL
feasible points are then evaluated in full. No test prompt is read; ``--out`` holds the resume store.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import optuna
import torch
from run_pair import rebuilt  # this directory's sibling module

from cnt_lens import NeuronPatch, NeuronScores
from cnt_lens.core.records import Point, Reference
from cnt_lens.method.divergence import watching
from cnt_lens.method.evaluate import measure
from cnt_lens.method.pareto import objectives, violation
from cnt_lens.method.resume import resumable
from cnt_lens.method.search import measure_reference, screened_reference
from cnt_lens.method.selection import NeuronSelection

GRID = [None, (0.5, 1.0, 0.0), (0.5, 1.0, 0.5), (0.25, 1.0, 0.0), (0.75, 1.0, 0.0), (0.25, 1.0, 0.5), (0.75, 1.0, 0.5)]


def kernel(n_layers: int, p: float, d: float, m: float) -> list[float]:
    """Per-layer weight: 1 at layer ``p·(n_layers−1)``, linearly down to ``m`` at distance ``d·(n_layers−1)``."""
    dist = (torch.arange(n_layers, dtype=torch.float32) - p * (n_layers - 1)).abs() / max(d * (n_layers - 1), 1e-6)
    return (1 - (1 - m) * dist.clamp(max=1)).tolist()


def measure_profiled(pair, behaviours, selection, alpha, weights, reference, constraint, search) -> Point:  # noqa: ANN001
    """``selection`` patched at ``alpha · weights[layer]`` per layer, measured as ``reference`` was, then reverted.

    ``search`` (the run's :class:`~cnt_lens.method.config.SearchConfig`) gives the goal and the batch size.
    """
    with contextlib.ExitStack() as applied:
        for layer in range(pair.n_layers):
            rows = selection.mask & (torch.arange(pair.n_layers) == layer)[:, None]
            if rows.any():
                scale = max(alpha * (1.0 if weights is None else weights[layer]), 1e-3)
                applied.enter_context(NeuronPatch.from_pair(pair, NeuronSelection(rows), scale).applied(pair.target))
        with watching(reference.kl) as seen:
            m = measure(pair.target, behaviours, reference.split, batch_size=search.batch_size,
                        estimate=reference.measured == "estimate")
        m.update(reference.kl.of(pair.target, seen))
    head = behaviours[0].headline
    closed = (m[head] - reference.target[head]) / (reference.donor[head] - reference.target[head])
    return Point("profiled", selection.n, selection.n / pair.n_neurons, alpha, closed, closed >= search.goal,
                 bool(constraint(m, reference)), reference.measured, m)


def line(label: str, point: Point) -> str:
    """One printed point."""
    n = point.numbers
    return (f"{label}: k {point.k}, alpha {point.alpha:.2f}, gap closed {point.gap_closed:.3f}, first-token KL "
            f"{n['kl_first_token']:.3f}, NLL {n['utility_nll']:.3f}, acceptable {point.acceptable}")


def search(pair, behaviours, scores, config, app, reference: Reference, trials: int, confirm: int) -> None:  # noqa: ANN001
    """The Optuna search over k, alpha and the profile on estimates; the lowest-KL feasible points in full."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    goal, k_max = config.search.goal, round(config.search.max_fraction * pair.n_neurons)
    sampler = optuna.samplers.GPSampler(seed=0, n_startup_trials=8, constraints_func=lambda t: (t.user_attrs["v"],))
    study = optuna.create_study(directions=["minimize"] * 3, sampler=sampler)
    for a in (4.0, 8.0):  # the bisection's openings: the largest set, no profile
        study.enqueue_trial({"k": k_max, "alpha": a, "p": 0.5, "d": 1.0, "m": 1.0})
    screened = []
    for _ in range(trials):
        t = study.ask()
        k, a = t.suggest_int("k", 16, k_max, log=True), t.suggest_float("alpha", 2.0, 8.0)
        w = kernel(pair.n_layers, t.suggest_float("p", 0.0, 1.0), t.suggest_float("d", 0.1, 1.0),
                   t.suggest_float("m", 0.0, 1.0))
        point = measure_profiled(pair, behaviours, scores.top_k(k), a, w, reference.estimate, app.constraint,
                                 config.search)
        t.set_user_attr("v", violation(point, goal - config.search.slack))
        study.tell(t, objectives(point))
        screened.append((point, w, t.params))
        print(line(f"estimate {[round(t.params[x], 2) for x in 'pdm']}", point), flush=True)
    feasible = sorted((s for s in screened if violation(s[0], goal - config.search.slack) == 0),
                      key=lambda s: s[0].numbers["kl_first_token"])
    for point, w, params in feasible[:confirm]:
        full = measure_profiled(pair, behaviours, scores.top_k(point.k), point.alpha, w, reference, app.constraint,
                                config.search)
        print(line(f"in full {[round(params[x], 2) for x in 'pdm']}", full) + f", goal reached {full.goal_reached}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="resume store of these points (not the run's own)")
    ap.add_argument("--k", type=int, default=None, help="neurons of the grid (default: the run's chosen set)")
    ap.add_argument("--trials", type=int, default=0)
    ap.add_argument("--confirm", type=int, default=5)
    args = ap.parse_args()
    with resumable(args.out):
        metrics, config, app, pair, behaviour = rebuilt(args.run)
        behaviours = [behaviour, *app.side_effects()]
        scores = NeuronScores.load(args.run / "scores" / f"{metrics['patched']['method']}.safetensors")
        reference = screened_reference(pair, behaviour, app.side_effects(), config.search, measure_reference(
            pair, behaviour, app.side_effects(), split=config.search.split, batch_size=config.search.batch_size))
        k = args.k or metrics["patched"]["n_neurons"]
        for profile in GRID:
            weights = None if profile is None else kernel(pair.n_layers, *profile)
            for alpha in (8.0, 10.0):
                point = measure_profiled(pair, behaviours, scores.top_k(k), alpha, weights, reference,
                                         app.constraint, config.search)
                print(line(f"grid (p, d, m) {profile or 'flat'}", point), flush=True)
        if args.trials:
            search(pair, behaviours, scores, config, app, reference, args.trials, args.confirm)


if __name__ == "__main__":
    main()
