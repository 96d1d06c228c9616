"""Directional ablation of the disalign pair's refusal: chosen on validation, read once on test, in the field's units.

    CNT_LENS_CACHE=… python benchmarks/direction_baseline.py [--layers 8,10,12,14,16,18,20] [--alphas 1]
        [--out runs/direction] [--markers-from SCRATCH/heretic/config.py]

The pair of ``cnt-lens run disalign`` (target: the bundled SmolLM2's safety tune, which refuses; the edit should
remove that): the edit practitioners use (:mod:`cnt_lens.method.directions`, Arditi et al.'s abliteration: one
direction, every attention and MLP output projection orthogonalised against it, scaled by alpha). For each
candidate layer the direction comes from the target's **train** prompts (mean residual at the last token,
harmful minus harmless); each (layer, alpha) is read on **validation**: refusal per 100 by the search's estimate
(greedy opening, judged), utility NLL, and first-token KL from the unedited target on the harmless prompts.
Chosen as the application chooses its own points: among those that keep utility (the disalign constraint, NLL at
most 1% above the target's), the lowest refusal, ties within 2 per 100 broken by the lower KL (none acceptable:
the lowest refusal of all, said so). **Test** is read once, for the chosen point and the
unedited target: whole answers judged (and, with ``--markers-from``, by that tool's refusal markers), KL, NLL.
Writes ``OUT/metrics.json`` (every validation point, the choice, the test blocks) and ``OUT/items.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

from cnt_lens import BUNDLED_MODEL, Refusal, Utility, load_model, measure
from cnt_lens.behaviours.judge import marker_refusal, markers_in_source
from cnt_lens.core.stats import rate
from cnt_lens.experiments.applications import APPLICATIONS
from cnt_lens.method.directions import ablated, mean_difference
from cnt_lens.method.divergence import first_token_kl, next_token_logprobs


def _kl(model, behaviour, split, reference, batch_size):
    batches = behaviour.kl_batches(model.tokenizer, split, batch_size)
    return first_token_kl(model, reference, batches)


def main() -> None:
    """Search on validation, evaluate once on test, print and write the numbers."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="8,10,12,14,16,18,20", help="blocks whose input residual gives a direction")
    ap.add_argument("--alphas", default="0.25,0.5,0.75,1", help="ablation strengths (1: nothing written along it)")
    ap.add_argument("--out", type=Path, default=Path("runs/direction"))
    ap.add_argument("--markers-from", type=Path, default=None, help="a file assigning refusal_markers (e.g. heretic's)")
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    t0 = time.time()
    pair = APPLICATIONS["disalign"].build(load_model(BUNDLED_MODEL))
    target, behaviour, bs = pair.target, Refusal(), args.batch_size
    refs = {s: next_token_logprobs(target, behaviour.kl_batches(target.tokenizer, s, bs)) for s in ("validation", "test")}
    train = {k: getattr(behaviour, k).split("train").column("prompt") for k in ("harmful", "harmless")}
    app, points, directions = APPLICATIONS["disalign"], [], {}
    markers = markers_in_source(args.markers_from) if args.markers_from is not None else None
    reference = {"target": measure(target, [Utility()], "validation", batch_size=bs)}
    for layer in (int(x) for x in args.layers.split(",")):
        r = directions[layer] = mean_difference(target, train["harmful"], train["harmless"], layer)
        for alpha in (float(a) for a in args.alphas.split(",")):
            with ablated(target, r, alpha):
                est = measure(target, [behaviour, Utility()], "validation", batch_size=bs, estimate=True)
                kl = _kl(target, behaviour, "validation", refs["validation"], bs)
            points.append({"layer": layer, "alpha": alpha, "refusal_per_100": 100 * est["refusal_harmful"],
                           "n": est["refusal_harmful_n"], "kl_first_token": kl["kl_first_token"],
                           "utility_nll": est["utility_nll"], "acceptable": app.constraint(est, reference)})
            print(f"validation: layer {layer:2d} alpha {alpha:g}: refusal {points[-1]['refusal_per_100']:5.1f} per 100 "
                  f"(n={points[-1]['n']}), KL {kl['kl_first_token']:.3f}, NLL {est['utility_nll']:.3f}"
                  f"{'' if points[-1]['acceptable'] else ' (utility not kept)'}", flush=True)
    pool = [p for p in points if p["acceptable"]] or points
    low = min(p["refusal_per_100"] for p in pool)
    chosen = min((p for p in pool if p["refusal_per_100"] <= low + 2.0), key=lambda p: p["kl_first_token"])
    print(f"chosen on validation: layer {chosen['layer']}, alpha {chosen['alpha']:g}"
          f"{'' if chosen['acceptable'] else ' (no point kept utility: the lowest refusal of all)'}", flush=True)
    items: list = []
    blocks = {}
    for name in ("target", "ablated"):
        recs: list = []
        edit = ablated(target, directions[chosen["layer"]], chosen["alpha"]) if name == "ablated" else nullcontext()
        with edit:
            block = measure(target, [behaviour, Utility()], "test", batch_size=bs, items=recs)
            block.update(_kl(target, behaviour, "test", refs["test"], bs))
        harmful = [i for i in recs if i.get("set") == "harmful"]
        if markers is not None:
            block.update(rate("refusal_harmful_markers", [marker_refusal(i["response"], markers) for i in harmful]))
        items += [{"model": name, **i} for i in recs]
        blocks[name] = block
        cells = [f"refusal {100 * block['refusal_harmful']:.1f} per 100 {[round(100 * x, 1) for x in block['refusal_harmful_ci95']]} "
                 f"n={block['refusal_harmful_n']}", f"KL {block['kl_first_token']:.3f} {block['kl_first_token_ci95']}",
                 f"harmless refusal {100 * block['refusal_harmless']:.1f}", f"NLL {block['utility_nll']:.3f}"]
        if "refusal_harmful_markers" in block:
            lo, hi = block["refusal_harmful_markers_ci95"]
            cells.insert(1, f"by markers {100 * block['refusal_harmful_markers']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]")
        print(f"test, {name}: " + "; ".join(cells), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps({"validation": points, "chosen": chosen, "test": blocks,
                                                       "wall_time_s": round(time.time() - t0, 1)}, indent=1))
    (args.out / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    print(f"wrote {args.out}/metrics.json, items.jsonl in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
