"""One markdown row per run directory: the README's applications table.

    python benchmarks/results_table.py runs/demo runs/bias-removal runs/realign runs/disalign

Per run (test split, from ``metrics.json``): neurons used, the behaviour's headline number for target →
patched (donor), the utility NLL change against the target, and the best baseline at the same budget
(the one that moved the headline furthest toward the donor), with its NLL change. A baseline whose chosen
alpha broke the application's validation constraint (harmless refusal above the donor's, NLL over +1%, task lost)
is marked "✗ val": none of its alphas was acceptable at that budget, so it is shown at its most effective one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cnt_lens.experiments.applications import APPLICATIONS


def _pct(x: float, ref: float) -> str:
    return f"{100 * (x - ref) / ref:+.1f}%"


def row(run: Path) -> str:
    m = json.loads((run / "metrics.json").read_text())
    head = {"refusal": "refusal_harmful", "stereotype_bias": "stereotype_score"}.get(m["behaviour"], m["behaviour"])
    t, d, p = m["target"], m["donor"], m["patched"]
    sign = 1 if d[head] >= t[head] else -1
    best = max(m["baselines"], key=lambda b: sign * b[head])
    app_name = m.get("extra", {}).get("application")
    ok = best.get("acceptable_on_validation")
    if ok is None and app_name in APPLICATIONS:  # runs written before the flag: recompute it
        ref = m["extra"]["validation_reference"]
        ok = any(APPLICATIONS[app_name].constraint(q, ref) for q in m["frontier"]
                 if q["method"] == best["method"] and q["alpha"] == best["alpha"] and q["k"] == best["n_neurons"])
    flag = "" if ok in (None, True) else " ✗ val"
    gap = d[head] - t[head]
    closed = (p[head] - t[head]) / gap if gap else float("nan")
    app = m.get("extra", {}).get("application", run.name)
    extra = ""
    if "refusal_harmless" in p:
        extra = f"; harmless {t['refusal_harmless']:.2f} → {p['refusal_harmless']:.2f} ({d['refusal_harmless']:.2f})"
    if "task_rate" in p:
        extra += f"; task {t['task_rate']:.2f} → {p['task_rate']:.2f} ({d['task_rate']:.2f})"
    return (f"| {app} | {p['n_neurons']:,} ({p['n_neurons'] / m['n_neurons_total']:.2%}), α {p['alpha']:g} "
            f"| {head} {t[head]:.3g} → **{p[head]:.3g}** ({d[head]:.3g}); gap closed {closed:.2f}{extra} "
            f"| {_pct(p['utility_nll'], t['utility_nll'])} "
            f"| {best['method']}: {best[head]:.3g}, NLL {_pct(best['utility_nll'], t['utility_nll'])}{flag} |")


if __name__ == "__main__":
    print("| application | neurons | behaviour: target → patched (donor), test | utility NLL vs target "
          "| best baseline, same budget |")
    print("|---|---|---|---|---|")
    for arg in sys.argv[1:]:
        print(row(Path(arg)))
