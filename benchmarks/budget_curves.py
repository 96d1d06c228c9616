"""Refusal on held-out prompt families against the number of transplanted neurons, for every ranking of a run.

    CNT_LENS_CACHE=... python benchmarks/budget_curves.py runs/cross [--fractions 0.005,0.01,0.02,0.05]
        [--alpha 4] [--methods attribution,random] [--merge runs/other]

Rebuilds a finished refusal run's pair with the application's cached recipes (``metrics.json`` names the
application and model) and reads every ranking the run saved (``scores/*.safetensors``: the main method
and each baseline, ranked on whatever objective the run used). For each ranking and each budget in
``--fractions`` (of all MLP neurons) it transplants the top-k neurons at that method's alpha — the one the
run chose for it on validation (``--alpha`` sets one for all) — and evaluates the patched target on the
cross-distribution protocol's held-out families (role-play, writing, backstory: prompts no choice in any
run saw) with their harmless twins for over-refusal, and utility NLL on the reference passages. Target and
donor are evaluated the same way, as the levels to start from and to reach.

Every point is one JSON line appended to ``RUN/budget_curves.jsonl`` as soon as it is measured; a rerun
skips the points already there, so an interrupted sweep resumes. At the end it writes
``RUN/budget_curves.json`` (the figure's points and reference lines) and rebuilds ``RUN/report.html``,
which draws the curves; ``scripts/screenshot_report.py RUN assets/`` turns them into an image. The
budgets are fixed before anything is read and nothing is chosen from these numbers: they are test rates.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
from dataclasses import replace
from pathlib import Path

from cnt_lens import NeuronPatch, NeuronScores, Utility, load_model, measure
from cnt_lens.core.files import append_jsonl, atomic_write_text
from cnt_lens.experiments.applications import APPLICATIONS, PROTOCOLS
from cnt_lens.method.config import TransferConfig
from cnt_lens.show.report import write_report

Y = "refusal_harmful"  # the held-out families only are evaluated, so the plain rate is theirs


def held_out(behaviour):
    """``behaviour`` (a cross-protocol Refusal) restricted to the families no choice saw."""
    keep = lambda r: r["role"] == "held_out"  # noqa: E731
    return replace(behaviour, harmful=behaviour.harmful.filter(keep, "held_out"),
                   harmless=behaviour.harmless.filter(keep, "held_out"))


def alphas_of(metrics: dict, names: list[str]) -> dict[str, float]:
    """Each saved ranking's alpha as the run chose it on validation (``names``: ``scores/``'s file stems).

    Baselines are named by their method; the main ranking's file by its scorer (e.g.
    ``iterative_weight_attribution``), so every name that is not a baseline's gets the patched alpha.
    """
    baselines = {b["method"]: float(b["alpha"]) for b in metrics["baselines"] if b.get("alpha") is not None}
    return {n: baselines.get(n, float(metrics["patched"]["alpha"])) for n in names}


BLIND = ("random", "weight_diff", "nlsr_drift")  # rankings that read no behaviour, so no objective


def objective_of(run: Path, method: str) -> str | None:
    """The objective ``method``'s saved ranking was scored on: its own metadata's, else the run's (None: reads none)."""
    if method in BLIND:
        return None
    path = run / "scores" / f"{method}.safetensors"
    own = NeuronScores.load(path).meta.get("objective") if path.is_file() else None
    return own or json.loads((run / "metrics.json").read_text())["extra"].get("objective", "opening")


def labelled(run: Path, points: list[dict]) -> list[dict]:
    """``points`` of ``run`` less the reference models, each method named with the objective it was ranked on."""
    def name(method: str) -> str:
        objective = objective_of(run, method)
        return method if objective is None else f"{method} ({objective})"

    return [{**p, "method": name(p["method"])} for p in points if p["method"] not in ("target", "donor")]


def read_points(run: Path) -> list[dict]:
    """The points ``run/budget_curves.jsonl`` holds (none before a first sweep)."""
    lines = run / "budget_curves.jsonl"
    return [json.loads(x) for x in lines.read_text().splitlines()] if lines.is_file() else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--fractions", default="0.005,0.01,0.02,0.05", help="budgets, as fractions of all MLP neurons")
    ap.add_argument("--alpha", type=float, default=None, help="one alpha for every ranking (default: the run's)")
    ap.add_argument("--methods", default=None, help="comma-separated rankings of scores/ to sweep (default: all)")
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="other runs of the same pair whose budget_curves.jsonl join this run's figure")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    metrics = json.loads((args.run / "metrics.json").read_text())
    run_extra = TransferConfig.from_dict(metrics["extra"]["config"]).about  # application and model
    app = APPLICATIONS[run_extra["application"]]
    saved = sorted((args.run / "scores").glob("*.safetensors"))
    if not saved:
        raise SystemExit(f"{args.run / 'scores'}: no saved rankings (*.safetensors); is it a finished run?")
    wanted = args.methods.split(",") if args.methods else [f.stem for f in saved]
    unknown = sorted(set(wanted) - {f.stem for f in saved})
    if unknown:
        raise SystemExit(f"--methods {unknown}: {args.run / 'scores'} holds {[f.stem for f in saved]}")
    score_files = [f for f in saved if f.stem in wanted]
    chosen = alphas_of(metrics, [f.stem for f in score_files])
    behaviours = [held_out(PROTOCOLS["cross"](app.behaviour())), Utility()]
    lines = args.run / "budget_curves.jsonl"
    done = read_points(args.run)
    seen = {(p["method"], p["k"], p["alpha"]) for p in done}

    @functools.cache
    def pair():
        """The run's pair, built (recipes, cached-donor check) only when a point is still to measure."""
        return app.build(load_model(run_extra["model"]))

    def record(point: dict, model, patch=None) -> None:
        if (point["method"], point["k"], point["alpha"]) in seen:
            return
        model = getattr(pair(), model)
        with patch(model) if patch else contextlib.nullcontext():
            got = measure(model, behaviours, "test", batch_size=args.batch_size)
        row = {**point, **got}
        done.append(row)
        append_jsonl(lines, row)
        print(f"{point['method']:>32} k={point['k']:>5} α={point['alpha']:g}: held-out refusal "
              f"{row[Y]:.3f} (n={row[Y + '_n']}), harmless {row['refusal_harmless']:.3f}, "
              f"NLL {row['utility_nll']:.3f}", flush=True)

    record({"method": "target", "k": 0, "alpha": 0.0}, "target")
    record({"method": "donor", "k": 0, "alpha": 0.0}, "donor")
    for path in score_files:
        scores = NeuronScores.load(path)
        alpha = args.alpha if args.alpha is not None else chosen[path.stem]
        for fraction in (float(x) for x in args.fractions.split(",")):
            k = round(fraction * scores.values.numel())
            record({"method": path.stem, "k": k, "fraction": fraction, "alpha": alpha}, "target",
                   lambda m, top=scores.top_k(k), a=alpha: NeuronPatch.from_pair(pair(), top, alpha=a).applied(m))
    ref = {p["method"]: p[Y] for p in done if p["method"] in ("target", "donor")}
    ref["0.9 of the gap"] = ref["target"] + 0.9 * (ref["donor"] - ref["target"])  # the level the goal asks for
    points = labelled(args.run, done)
    for other in args.merge:
        same = TransferConfig.from_dict(json.loads((other / "metrics.json").read_text())["extra"]["config"]).about
        if same != run_extra:
            raise SystemExit(f"--merge {other}: its pair is {same}, this run's {run_extra}; curves must share a pair")
        points += labelled(other, read_points(other))
    curves = {"points": points, "y": Y, "references": ref,
              "title": "refusal on held-out prompt families (test) vs transplanted neurons"}
    atomic_write_text(args.run / "budget_curves.json", json.dumps(curves, default=float))
    print(f"wrote {args.run / 'budget_curves.json'} and {write_report(args.run)}")


if __name__ == "__main__":
    main()
