"""Screenshots of a run's report in headless Chromium: its top, first neuron card, budget curves, refusals vs KL.

Run from the repository root after a run (``cnt-lens transfer … --out runs/transfer``)::

    .venv/bin/python scripts/screenshot_report.py runs/transfer assets/ [report_top report_card budget_curves refusal_kl]

writes ``report_top.png`` (metrics table and example responses), ``report_card.png`` (the first neuron
card of ``cards.json``, drawn alone, as the report draws it) and ``budget_curves.png`` (the run's
``budget_curves.json`` from ``benchmarks/budget_curves.py``, drawn alone) and ``refusal_kl.png`` (refusals per 100
against first-token KL, every model of ``metrics.json``, baselines a benchmark added included) — those named, or all.
Needs ``chromium`` on PATH (``bash scripts/setup --browser``). Every host is unresolvable for the browser:
nothing is fetched.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cnt_lens.method.evaluate import Report
from cnt_lens.show.inspector import card_figure
from cnt_lens.show.plots import frontier, refusal_kl


def shoot(page: Path, png: Path, size: str) -> None:
    """Screenshot ``page`` at ``size`` (``W,H``) into ``png``."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed: run `bash scripts/setup --browser`")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                        "--host-resolver-rules=MAP * ~NOTFOUND", f"--window-size={size}",
                        f"--screenshot={png}", page.resolve().as_uri()], check=True, capture_output=True)
    print(f"wrote {png} ({png.stat().st_size:,} bytes)")


SHOTS = ("report_top", "report_card", "budget_curves", "refusal_kl")


def main(run_dir: str, out_dir: str, *names: str) -> None:
    """Write the screenshots ``names`` (default: all of :data:`SHOTS`) of ``run_dir``'s report into ``out_dir``."""
    run, out = Path(run_dir), Path(out_dir)
    names = names or SHOTS
    unknown = sorted(set(names) - set(SHOTS))
    if unknown:
        sys.exit(f"unknown screenshot {unknown}; one of {list(SHOTS)}")
    out.mkdir(parents=True, exist_ok=True)
    if "report_top" in names:
        shoot(run / "report.html", out / "report_top.png", "1280,1500")
    figures = {}
    if "report_card" in names:
        cards = json.loads((run / "cards.json").read_text())
        if not cards:
            sys.exit(f"{run / 'cards.json'} holds no neuron cards")
        figures["report_card"] = card_figure(cards[0])
    if "budget_curves" in names:
        curves = run / "budget_curves.json"
        if not curves.is_file():
            sys.exit(f"{curves} is missing: run `python benchmarks/budget_curves.py {run}` first")
        figures["budget_curves"] = frontier(**json.loads(curves.read_text()))
    if "refusal_kl" in names:
        fig = refusal_kl(Report.load(run / "metrics.json"))
        if fig is None:
            sys.exit(f"{run / 'metrics.json'} has no refusal headline or no first-token KL to draw")
        figures["refusal_kl"] = fig
    with tempfile.TemporaryDirectory() as tmp:
        for name, fig in figures.items():
            page = Path(tmp) / f"{name}.html"
            page.write_text(fig.to_html(full_html=True, include_plotlyjs="inline"), encoding="utf-8")
            shoot(page, out / f"{name}.png", "1280,900")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
