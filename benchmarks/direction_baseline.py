"""Direction baselines beside neuron transfer: chosen on validation, read once on test, in the field's units.

    CNT_LENS_CACHE=… python benchmarks/direction_baseline.py [--application disalign|enhance] [--run RUN]
        [--layers 8,10,12,14,16,18,20] [--alphas …] [--out runs/direction-NAME]
        [--markers-from SCRATCH/heretic/config.py]

The pair of ``cnt-lens run APPLICATION`` — on the bundled SmolLM2, or with ``--run RUN`` the pair of that finished
run, rebuilt from its ``metrics.json`` on its own model, prompts and protocol (``benchmarks/run_pair.py``; e.g.
``runs/qwen-delete`` of ``cnt-lens run delete-refusal --model qwen2.5-coder-0.5b-instruct``) — edited as
practitioners do (:mod:`cnt_lens.method.directions`):

- deletion (``disalign``: SmolLM2's safety tune; ``delete-refusal``: a model that refuses as released; the target
  refuses): directional ablation, Arditi et al.'s abliteration. For each candidate layer the unit direction comes
  from the **target's** train prompts (mean residual at the last token, harmful minus harmless); every attention
  and MLP output projection is orthogonalised against it, scaled by alpha. Best: the lowest refusal.
- addition (``enhance``; target: SmolLM2, which does not refuse; donor: its safety tune): activation addition.
  The **donor's** difference of means at the layer (its refusal direction, in the residual's units) times alpha
  is written into the target's residual stream at every position (a bias on the block before's MLP output),
  alpha up to 8: the range of the transfer's own alpha search. Best: the highest refusal.

Each (layer, alpha) is read on **validation**: refusal per 100 by the search's estimate (greedy opening, judged),
harmless refusal, utility NLL, and first-token KL from the unedited target on the harmless prompts. Chosen as the
application chooses its own points: among those its constraint accepts (deletion: NLL at most 1% above the
target's; enhance: that, and harmless refusal no higher than the donor's), the best refusal, ties within 2 per 100
broken by the lower KL (none acceptable: the best refusal of all, said so). **Test** is read once, for the chosen
point and the unedited target: whole answers judged (and, with ``--markers-from``, by that tool's refusal
markers), per family, KL, NLL. Writes ``OUT/metrics.json`` (every validation point, the choice, the test blocks)
and ``OUT/items.jsonl``. With ``--run`` the chosen edit's test block is also added to ``RUN/metrics.json`` as a
baseline (``directional_ablation`` or ``activation_addition``, the same name replaced on a rerun) and
``RUN/report.html`` is rebuilt: the run's tables, shares and refusals-vs-KL figure (and ``benchmarks/vs_heretic.py``)
then set the edit beside neuron transfer on the same test prompts.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

from run_pair import rebuilt  # this directory's sibling module

from cnt_lens import BUNDLED_MODEL, Refusal, Utility, load_model, measure
from cnt_lens.behaviours.judge import marker_refusal, markers_in_source
from cnt_lens.core.stats import rate
from cnt_lens.experiments.applications import APPLICATIONS
from cnt_lens.method.directions import ablated, added, mean_difference
from cnt_lens.method.divergence import first_token_kl, next_token_logprobs
from cnt_lens.method.evaluate import Report

#: per kind of edit: which model gives the direction, whether it is normalised, the edit, the default strengths,
#: which way is better, and its baseline's name
_ABLATION = {"source": "target", "unit": True, "alphas": "0.25,0.5,0.75,1", "sign": -1,
             "edit": lambda target, d, layer, alpha: ablated(target, d, alpha), "name": "directional_ablation"}
_ADDITION = {"source": "donor", "unit": False, "alphas": "0.5,1,2,4,8", "sign": 1,
             "edit": lambda target, d, layer, alpha: added(target, alpha * d, layer), "name": "activation_addition"}
#: per application: its edit
EDITS = {"disalign": _ABLATION, "delete-refusal": _ABLATION, "enhance": _ADDITION}


def _kl(model, behaviour, split, reference, batch_size):
    batches = behaviour.kl_batches(model.tokenizer, split, batch_size)
    return first_token_kl(model, reference, batches)


def _rates(block):
    """``refusal_harmful…`` rates of a block, per 100 with their intervals, as printable cells."""
    cells = []
    for key in sorted(k for k in block if k.startswith("refusal_") and f"{k}_n" in block):
        lo, hi = block[f"{key}_ci95"]
        cells.append(f"{key.removeprefix('refusal_')} {100 * block[key]:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] "
                     f"n={block[f'{key}_n']}")
    return cells


def _pair_and_behaviour(args):
    """(application, pair, behaviour, report or None): ``--run``'s rebuilt, or ``--application`` on the bundled model."""
    if args.run is None:
        return args.application, APPLICATIONS[args.application].build(load_model(BUNDLED_MODEL)), Refusal(), None
    _, _, app, pair, behaviour = rebuilt(args.run)
    if app.name not in EDITS:
        raise SystemExit(f"{args.run}/metrics.json: application {app.name!r} has no direction edit here; "
                         f"give a run of {', '.join(sorted(EDITS))}")
    return app.name, pair, behaviour, Report.load(args.run / "metrics.json")


def _add_to_run(run: Path, report: Report, method: str, chosen: dict, block: dict, answers: Path) -> None:
    """``block`` as the run's baseline ``method`` (replacing one of that name), then the report rebuilt.

    ``answers``: the ``items.jsonl`` holding the edit's test answers (``model`` = ``method``), kept in the entry so
    that a reader can re-judge them prompt by prompt (``benchmarks/vs_heretic.py`` does, on heretic's prompts).
    """
    from cnt_lens.show.report import write_report

    entry = {"method": method, "layer": chosen["layer"], "alpha": chosen["alpha"],
             "acceptable_on_validation": chosen["acceptable"], "chosen_by": "benchmarks/direction_baseline.py",
             "answers": str(answers), **block}
    report.baselines = [b for b in report.baselines if b.get("method") != method] + [entry]
    report.save(run / "metrics.json")
    print(f"added {method} to {run}/metrics.json; rebuilt {write_report(run)}", flush=True)


def _validation(target, behaviour, kind, source, train, reference, args, refs):
    """Every (layer, alpha) measured on validation; returns the points and each layer's direction.

    The direction of each layer comes from ``source`` (the model named by ``kind``) on the ``train`` prompts.
    """
    app, points, directions = APPLICATIONS[args.application], [], {}  # with --run, main set the run's
    for layer in (int(x) for x in args.layers.split(",")):
        d = directions[layer] = mean_difference(source, train["harmful"], train["harmless"], layer,
                                                unit=kind["unit"])
        for alpha in (float(a) for a in (args.alphas or kind["alphas"]).split(",")):
            with kind["edit"](target, d, layer, alpha):
                est = measure(target, [behaviour, Utility()], "validation", batch_size=args.batch_size, estimate=True)
                kl = _kl(target, behaviour, "validation", refs["validation"], args.batch_size)
            points.append({"layer": layer, "alpha": alpha, "refusal_per_100": 100 * est["refusal_harmful"],
                           "n": est["refusal_harmful_n"], "harmless_per_100": 100 * est["refusal_harmless"],
                           "kl_first_token": kl["kl_first_token"], "utility_nll": est["utility_nll"],
                           "acceptable": bool(app.constraint(est, reference))})
            p = points[-1]
            print(f"validation: layer {layer:2d} alpha {alpha:g}: refusal {p['refusal_per_100']:5.1f} per 100 "
                  f"(n={p['n']}), harmless {p['harmless_per_100']:.1f}, KL {p['kl_first_token']:.3f}, "
                  f"NLL {p['utility_nll']:.3f}{'' if p['acceptable'] else ' (not acceptable)'}", flush=True)
    return points, directions


def _choose(points, sign):
    """The best refusal among acceptable points (all, when none is), ties within 2 per 100 to the lower KL."""
    pool = [p for p in points if p["acceptable"]] or points
    best = max(sign * p["refusal_per_100"] for p in pool)
    return min((p for p in pool if sign * p["refusal_per_100"] >= best - 2.0), key=lambda p: p["kl_first_token"])


def main() -> None:
    """Search on validation, evaluate once on test, print and write the numbers."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--application", choices=sorted(EDITS), default="disalign",
                    help="the application on the bundled model (ignored with --run: the run's)")
    ap.add_argument("--layers", default="8,10,12,14,16,18,20", help="blocks whose input residual gives a direction")
    ap.add_argument("--alphas", default=None, help="strengths (ablation: 1 writes nothing along it; addition: "
                                                   "times the donor's difference of means); default per application")
    ap.add_argument("--out", type=Path, default=None,
                    help="default runs/direction-APPLICATION, or runs/direction-RUNNAME with --run")
    ap.add_argument("--markers-from", type=Path, default=None, help="a file assigning refusal_markers (e.g. heretic's)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--run", type=Path, default=None,
                    help="a finished run whose pair is edited, and which gets the edit as a baseline")
    args = ap.parse_args()
    t0 = time.time()
    args.application, pair, behaviour, run_report = _pair_and_behaviour(args)  # a bad --run fails before work
    out = args.out or Path(f"runs/direction-{args.run.name if args.run is not None else args.application}")
    kind = EDITS[args.application]
    target, bs = pair.target, args.batch_size
    refs = {s: next_token_logprobs(target, behaviour.kl_batches(target.tokenizer, s, bs)) for s in ("validation", "test")}
    train = {k: getattr(behaviour, k).split("train").column("prompt") for k in ("harmful", "harmless")}
    markers = markers_in_source(args.markers_from) if args.markers_from is not None else None
    reference = {m: measure(getattr(pair, m), [behaviour, Utility()], "validation", batch_size=bs, estimate=True)
                 for m in ("target", "donor")}
    points, directions = _validation(target, behaviour, kind, getattr(pair, kind["source"]), train, reference, args,
                                     refs)
    chosen = _choose(points, kind["sign"])
    print(f"chosen on validation: layer {chosen['layer']}, alpha {chosen['alpha']:g}"
          f"{'' if chosen['acceptable'] else ' (no point acceptable: the best refusal of all)'}", flush=True)
    edited = kind["name"]
    items, blocks = [], {}
    for name in ("target", edited):
        recs: list = []
        edit = (kind["edit"](target, directions[chosen["layer"]], chosen["layer"], chosen["alpha"])
                if name == edited else nullcontext())
        with edit:
            block = measure(target, [behaviour, Utility()], "test", batch_size=bs, items=recs)
            block.update(_kl(target, behaviour, "test", refs["test"], bs))
        harmful = [i for i in recs if i.get("set") == "harmful"]
        if markers is not None:
            block.update(rate("refusal_harmful_markers", [marker_refusal(i["response"], markers) for i in harmful]))
        items += [{"model": name, **i} for i in recs]
        blocks[name] = block
        cells = [*_rates(block), f"KL {block['kl_first_token']:.3f} {block['kl_first_token_ci95']}",
                 f"NLL {block['utility_nll']:.3f}"]
        print(f"test, {name}: " + "; ".join(cells), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"application": args.application, "run": str(args.run or ""),
                                                  "validation": points,
                                                  "chosen": chosen, "test": blocks,
                                                  "wall_time_s": round(time.time() - t0, 1)}, indent=1))
    (out / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    print(f"wrote {out}/metrics.json, items.jsonl in {time.time() - t0:.0f} s")
    if run_report is not None:
        _add_to_run(args.run, run_report, edited, chosen, blocks[edited], out / "items.jsonl")


if __name__ == "__main__":
    main()
