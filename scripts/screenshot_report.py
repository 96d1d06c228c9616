"""Screenshots of a run's report in headless Chromium: its top and its first neuron card.

Run from the repository root after a run (``cnt-lens transfer … --out runs/transfer``)::

    .venv/bin/python scripts/screenshot_report.py runs/transfer assets/

writes ``report_top.png`` (metrics table and example responses) and ``report_card.png`` (the first
neuron card of ``cards.json``, drawn alone, as the report draws it). Needs ``chromium`` on PATH
(``bash scripts/setup --browser``). Every host is unresolvable for the browser: nothing is fetched.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cnt_lens.inspector import card_figure


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


def main(run_dir: str, out_dir: str) -> None:
    """Write both screenshots of ``run_dir``'s report into ``out_dir``."""
    run, out = Path(run_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shoot(run / "report.html", out / "report_top.png", "1280,1500")
    cards = json.loads((run / "cards.json").read_text())
    if not cards:
        sys.exit(f"{run / 'cards.json'} holds no neuron cards")
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "card.html"
        page.write_text(card_figure(cards[0]).to_html(full_html=True, include_plotlyjs="inline"), encoding="utf-8")
        shoot(page, out / "report_card.png", "1280,900")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
