"""Refusals per 100 in a run's test answers, by the project's judge and by a marker list (e.g. heretic's), side by side.

    python benchmarks/refusal_markers.py RUN_DIR --markers-from PATH/heretic/config.py [--show 3] [--labels FILE]

Reads ``RUN_DIR/items.jsonl`` (every test answer of the target, the donor and the patched model, whole, with the
judge's verdict) and judges each answer again with :func:`~cnt_lens.behaviours.judge.marker_refusal` and the
markers that ``--markers-from`` assigns to ``refusal_markers`` (read from the file's source by
:func:`~cnt_lens.behaviours.judge.markers_in_source`: a peer tool installed in a scratch venv, never imported,
nothing copied). Prints, per model, set and prompt family: refusals per 100 with their Wilson 95% interval and n
by each rule, and how many answers the two rules disagree on; ``--show`` prints that many disagreements per model.
The answers are the run's own (its ``max_new_tokens``, 48 by default): a marker that a longer answer would reach
later is not seen.

``--labels FILE`` (JSONL: ``model``, ``prompt``, ``refusal``, ``reading``) adds a third reading, by hand: a labelled
answer counts as its label says, an unlabelled one as the two rules do where they agree; the column says how many
answers the rules dispute that the file leaves unlabelled (read by the judge). ``benchmarks/labels/`` holds such
files, one reader's reading of every disputed harmful answer of one run, said in each row.
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


def _labels(path: Path | None) -> dict[tuple[str, str], bool]:
    """(model, prompt) → the hand label of ``path`` (none without a file)."""
    if path is None:
        return {}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {(r["model"], r["prompt"]): bool(r["refusal"]) for r in rows}


def _by_hand(group: list[dict], marks: list[bool], labels: dict[tuple[str, str], bool]) -> tuple[list[bool], int]:
    """Each answer's hand label, or the judge's verdict where there is none; and how many disputed ones had none."""
    flags, unread = [], 0
    for i, m in zip(group, marks):
        label = labels.get((i["model"], i["prompt"]))
        unread += label is None and bool(i["refused"]) != m
        flags.append(bool(i["refused"]) if label is None else label)
    return flags, unread


def main() -> None:
    """Print the side-by-side table (and, with ``--show``, the answers the rules disagree on)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--markers-from", type=Path, required=True, help="a Python file that assigns refusal_markers")
    ap.add_argument("--show", type=int, default=0, help="disagreements to print per model")
    ap.add_argument("--labels", type=Path, default=None, help="hand labels of disputed answers (JSONL)")
    args = ap.parse_args()
    markers = markers_in_source(args.markers_from)
    labels = _labels(args.labels)
    items = [json.loads(line) for line in (args.run_dir / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    items = [i for i in items if "refused" in i]
    print(f"{len(markers)} markers from {args.markers_from}; {len(items)} answers from {args.run_dir / 'items.jsonl'}")
    hand = " by hand, per 100 (disputed, unlabelled) |" if labels else ""
    print(f"| model | set | family | n | judge, per 100 | markers, per 100 | judge only | markers only |{hand}")
    print("|---|---|---|---|---|---|---|---|" + ("---|" if labels else ""))
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
                flags, unread = _by_hand(group, marks, labels)
                print(f"| {model} | {kind} | {family or 'all'} | {len(group)} | {_cell('j', judge)} | "
                      f"{_cell('m', marks)} | {sum(j and not m for j, m in zip(judge, marks))} | "
                      f"{sum(m and not j for j, m in zip(judge, marks))} |"
                      + (f" {_cell('h', flags)} ({unread}) |" if labels else ""))
        split = [i for i in mine if bool(i["refused"]) != marker_refusal(i["response"], markers)]
        for i in split[:args.show]:
            print(f"  {model}, judge {'refusal' if i['refused'] else 'no refusal'}: {i['response'][:160]!r}")


if __name__ == "__main__":
    main()
