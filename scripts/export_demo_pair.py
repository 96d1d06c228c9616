"""Export the bundled SmolLM2-135M-Instruct and its safety-tuned sibling as two HF checkpoint directories.

    .venv/bin/python scripts/export_demo_pair.py runs/pair
    .venv/bin/cnt-lens transfer --donor runs/pair/donor --target runs/pair/target --out runs/transfer

The donor is the cached safety tune of the demo (``cnt_lens.experiments.recipes.safety_tune``; made on first use,
a few minutes on 2 CPU cores). The directories load anywhere ``transformers`` does, offline, so
``cnt-lens transfer`` can be tried on checkpoints given as paths, as with a researcher's own models.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cnt_lens import BUNDLED_MODEL, canary, export_hf, load_model
from cnt_lens.experiments.recipes import safety_tune


def main(out: str) -> None:
    base = load_model(BUNDLED_MODEL)
    canary(base, expect="Paris")
    donor = safety_tune(base)
    for name, model in (("target", base), ("donor", donor)):
        print(f"wrote {export_hf(model, Path(out) / name, overwrite=True)}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
