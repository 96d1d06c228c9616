"""Refusals per 100 in a run's test answers, by the project's judge and by a marker list (e.g. heretic's), side by side.

    python benchmarks/refusal_markers.py RUN_DIR --markers-from PATH/heretic/config.py [--show 3]

Reads ``RUN_DIR/items.jsonl`` (every test answer of the target, the donor and the patched model, whole, with the
judge's verdict) and judges each answer again with :func:`~cnt_lens.behaviours.judge.marker_refusal` and the
markers that ``--markers-from`` assigns to ``refusal_markers`` (read from the file's source by
:func:`~cnt_lens.behaviours.judge.markers_in_source`: a peer tool installed in a scratch venv, never imported,
nothing copied). Prints, per model, set and prompt family: refusals per 100 with their Wilson 95% interval and n
by each rule, and how many answers the two rules disagree on; ``--show`` prints that many disagreements per model.
The answers are the run's own (its ``max_new_tokens``, 48 by default): a marker that a longer answer would reach
later is not seen.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cnt_lens.behaviours.judge import marker_refusal, markers_in_source
from cnt_lens.core.stats import rate


def _cell(name: str, flags: list[bool]) -> str:
    r = rate(name, flags, scale=100.0)
    lo, hi = r[f"{name}_ci95"]
    return f"{r[name]:.1f} [{lo:.1f}, {hi:.1f}]"


def main() -> None:
    """Print the side-by-side table (and, with ``--show``, the answers the rules disagree on)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--markers-from", type=Path, required=True, help="a Python file that assigns refusal_markers")
    ap.add_argument("--show", type=int, default=0, help="disagreements to print per model")
    args = ap.parse_args()
    markers = markers_in_source(args.markers_from)
    items = [json.loads(line) for line in (args.run_dir / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    items = [i for i in items if "refused" in i]
    print(f"{len(markers)} markers from {args.markers_from}; {len(items)} answers from {args.run_dir / 'items.jsonl'}")
    print("| model | set | family | n | judge, per 100 | markers, per 100 | judge only | markers only |")
    print("|---|---|---|---|---|---|---|---|")
    for model in dict.fromkeys(i["model"] for i in items):
        mine = [i for i in items if i["model"] == model]
        for kind in ("harmful", "harmless"):
            sel = [i for i in mine if i["set"] == kind]
            for family in [None, *sorted({i.get("family") for i in sel if i.get("family")})]:
                group = [i for i in sel if family is None or i.get("family") == family]
                judge = [bool(i["refused"]) for i in group]
                marks = [marker_refusal(i["response"], markers) for i in group]
                if not group or (family is not None and len(group) == len(sel)):
                    continue
                print(f"| {model} | {kind} | {family or 'all'} | {len(group)} | {_cell('j', judge)} | "
                      f"{_cell('m', marks)} | {sum(j and not m for j, m in zip(judge, marks))} | "
                      f"{sum(m and not j for j, m in zip(judge, marks))} |")
        split = [i for i in mine if bool(i["refused"]) != marker_refusal(i["response"], markers)]
        for i in split[:args.show]:
            print(f"  {model}, judge {'refusal' if i['refused'] else 'no refusal'}: {i['response'][:160]!r}")


if __name__ == "__main__":
    main()
