"""The headline table of README.md and RESULTS.md, made from run directories, so the two cannot disagree.

    .venv/bin/python scripts/headline.py add runs/demo --name "demo (SmolLM2-135M, enhance)"
    .venv/bin/python scripts/headline.py            # rewrite the tables from docs/runs/*.json

``add`` keeps a small summary of a run's ``metrics.json`` (and the command and date that made it) in
``docs/runs/<slug>.json``, which is committed; the table is rebuilt from those summaries between the
``<!-- headline:start -->`` / ``<!-- headline:end -->`` markers of README.md and RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

from cnt_lens.core.stats import format_rate
from cnt_lens.method.divergence import KL_NAME
from cnt_lens.method.evaluate import Report

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "docs" / "runs"
PAGES = [ROOT / "README.md", ROOT / "RESULTS.md"]
START, END = "<!-- headline:start -->", "<!-- headline:end -->"


def summary(run: Path, name: str, command: str) -> dict:
    """What the table needs from one run directory."""
    report = Report.load(run / "metrics.json")
    head = report.headline()
    shares = {r["group"]: r for r in report.shares(head)} if head else {}
    side = {k: {m: getattr(report, m).get(k) for m in ("target", "patched", "donor")}
            for k in ("refusal_harmless", "utility_nll")}
    random = next((b for b in report.baselines if b.get("method") == "random"), None)
    return {
        "name": name, "command": command, "date": datetime.date.today().isoformat(),
        "headline": head, "n_neurons": report.patched.get("n_neurons"), "n_total": report.n_neurons_total,
        "alpha": report.patched.get("alpha"),
        "rates": {m: format_rate(getattr(report, m), head, digits=3) for m in ("target", "patched", "donor")},
        "random": format_rate(random, head, digits=3) if random else None,
        "share": shares.get("all", {}).get("share"),
        "held_out_share": shares.get("held_out", {}).get("share"),
        "held_out_n": shares.get("held_out", {}).get("n"),
        "over_refusal": {m: format_rate(getattr(report, m), "refusal_harmless", digits=3)
                         for m in ("target", "patched", "donor") if side["refusal_harmless"][m] is not None},
        "nll_change": (side["utility_nll"]["patched"] / side["utility_nll"]["target"] - 1
                       if side["utility_nll"]["target"] else None),
        "kl": {m: format_rate(getattr(report, m), KL_NAME, digits=3) for m in ("patched", "donor")
               if getattr(report, m).get(KL_NAME) is not None},
    }


def table(rows: list[dict]) -> str:
    """The markdown table (and the commands and dates under it)."""
    lines = ["| run | neurons | α | headline: target → **patched** → donor | share of gap (held out) | random, same k and α "
             "| over-refusal: target → patched | NLL change | first-token KL from target: patched (donor) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        held = f" ({r['held_out_share']:.2f}, n={r['held_out_n']})" if r["held_out_share"] is not None else ""
        over = r["over_refusal"]
        nll = "–" if r["nll_change"] is None else f"{r['nll_change']:+.1%}"
        kl = r.get("kl") or {}
        kl_cell = f"{kl['patched']} ({kl.get('donor', '–')})" if "patched" in kl else "–"
        lines.append(
            f"| {r['name']} | {r['n_neurons']} ({r['n_neurons'] / r['n_total']:.2%}) | {r['alpha']:g} | `{r['headline']}` "
            f"{r['rates']['target']} → **{r['rates']['patched']}** → {r['rates']['donor']} | "
            f"{r['share']:.2f}{held} | {r['random'] or '–'} | "
            f"{over.get('target', '–')} → {over.get('patched', '–')} | {nll} | {kl_cell} |")
    lines += [""] + [f"{r['name']}: `{r['command']}` ({r['date']})." for r in rows]
    return "\n".join(lines)


def rewrite(text: str, block: str, page: Path) -> str:
    """``text`` with the block between the markers replaced."""
    if START not in text or END not in text:
        sys.exit(f"{page}: no {START} … {END} markers; add them where the table goes")
    pre, rest = text.split(START, 1)
    return pre + START + "\n" + block + "\n" + END + rest.split(END, 1)[1]


def main() -> None:
    """``add RUN --name NAME [--command CMD]`` or no arguments (rebuild the tables)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", nargs="?", choices=["add"], help="add a run's summary, then rebuild")
    p.add_argument("run", nargs="?", type=Path)
    p.add_argument("--name")
    p.add_argument("--command", default="")
    args = p.parse_args()
    if args.action == "add":
        if args.run is None or not args.name:
            p.error("add needs RUN and --name")
        RUNS.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "-", args.name.lower()).strip("-")
        command = args.command or f"cnt-lens demo --out {args.run}"
        (RUNS / f"{slug}.json").write_text(json.dumps(summary(args.run, args.name, command), indent=1) + "\n")
    rows = [json.loads(f.read_text()) for f in sorted(RUNS.glob("*.json"))]
    block = table(rows)
    for page in PAGES:
        page.write_text(rewrite(page.read_text(encoding="utf-8"), block, page), encoding="utf-8")
    print(block)


if __name__ == "__main__":
    main()
