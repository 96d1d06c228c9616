"""Two run directories side by side: where the time went (``timings.json``) and what the runs found (``metrics.json``).

    python benchmarks/compare_runs.py runs/before runs/after [--depth 1] [--numbers refusal_harmful,utility_nll]

For a speed change, run the same command before and after it on the same machine, then compare: the
per-stage table prints each stage's seconds in both runs and their ratio (before ÷ after), and the
metrics table the test numbers of the target, donor, patched model and every baseline in both runs,
so a faster run that transfers less shows as plainly as the speed-up. Stages present in one run only
print a dash for the other.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cnt_lens.core.stats import format_rate


def stage_table(a: dict[str, Any], b: dict[str, Any], depth: int) -> str:
    """Seconds per stage (nested up to ``depth``) in runs ``a`` and ``b``, and a ÷ b."""
    sa = {r["stage"]: r for r in a["stages"]}
    sb = {r["stage"]: r for r in b["stages"]}
    names = list(sa) + [s for s in sb if s not in sa]
    lines = [f"{'stage':<58} {'A s':>8} {'B s':>8} {'A/B':>6}"]
    for name in names:
        row = sa.get(name) or sb[name]
        if row["depth"] > depth:
            continue
        ta, tb = sa.get(name, {}).get("seconds"), sb.get(name, {}).get("seconds")
        label = ("  " * row["depth"] + name.rsplit(" / ", 1)[-1])[:58]
        ratio = f"{ta / tb:6.1f}" if ta is not None and tb else "     -"
        lines.append(f"{label:<58} {_s(ta):>8} {_s(tb):>8} {ratio}")
    lines.append(f"{'total (wall)':<58} {a['total_s']:>8.1f} {b['total_s']:>8.1f} {a['total_s'] / b['total_s']:6.2f}")
    return "\n".join(lines)


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}"


def metrics_table(a: dict[str, Any], b: dict[str, Any], numbers: list[str]) -> str:
    """Each model's test ``numbers`` (rates with interval and n), run A above run B."""
    lines = ["| model | run | " + " | ".join(numbers) + " | neurons | alpha |", "|---" * (len(numbers) + 4) + "|"]
    for label, pick in (("target", lambda m: m["target"]), ("donor", lambda m: m["donor"]),
                        ("patched", lambda m: m["patched"])):
        lines += [_row(label, run, pick(m), numbers) for run, m in (("A", a), ("B", b))]
    methods = [x["method"] for x in a["baselines"]] + [x["method"] for x in b["baselines"]
                                                         if x["method"] not in {y["method"] for y in a["baselines"]}]
    for method in methods:
        for run, m in (("A", a), ("B", b)):
            block = next((x for x in m["baselines"] if x["method"] == method), None)
            if block is not None:
                lines.append(_row(method, run, block, numbers))
    return "\n".join(lines)


def _row(label: str, run: str, block: dict[str, Any], numbers: list[str]) -> str:
    cells = [format_rate(block, n) if n in block else "-" for n in numbers]
    return f"| {label} | {run} | " + " | ".join(cells) + f" | {block.get('n_neurons', '')} | {block.get('alpha', '')} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="run directory A (e.g. before a change)")
    p.add_argument("b", type=Path, help="run directory B (e.g. after it)")
    p.add_argument("--depth", type=int, default=1, help="deepest nested stage to print (0 = top level)")
    p.add_argument("--numbers", default="refusal_harmful,refusal_harmful_advbench,refusal_harmless,utility_nll",
                   help="comma-separated metrics to tabulate")
    args = p.parse_args()
    load = lambda run, name: json.loads((run / name).read_text())  # noqa: E731
    print(stage_table(load(args.a, "timings.json"), load(args.b, "timings.json"), args.depth))
    print()
    print(metrics_table(load(args.a, "metrics.json"), load(args.b, "metrics.json"), args.numbers.split(",")))


if __name__ == "__main__":
    main()
