"""One recipe's donor built cold, stage by stage: the time a run's first stage takes on a fresh machine.

    CNT_LENS_CACHE=$(mktemp -d) python benchmarks/bench_tune.py [--model smollm2-135m-instruct] [--out tune.json]
        [--weights tune.safetensors] [--compare other.safetensors]

Builds ``safety_tune`` of ``--model`` (``--recipe``: safety or compliance) with an empty tune cache (it refuses a
cache that holds one: a load would time nothing) and prints the stage table (self-distillation, fine-tune, check
and save). ``--weights`` keeps the tuned weights; ``--compare`` prints the largest absolute and relative
difference from weights kept by another build — two builds that should agree up to float rounding (e.g. two
commits, each run from its own checkout with ``PYTHONPATH``) are compared this way. Offline models
(``qwen2.5-coder-0.5b-instruct``) are read from the tune cache's ``models/``: link it into the empty cache.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

import cnt_lens
from cnt_lens import BUNDLED_MODEL, load_model
from cnt_lens.core.files import cache_dir
from cnt_lens.core.timing import profile
from cnt_lens.experiments.recipes import compliance_tune, safety_tune
from cnt_lens.models.hf import hf_state_dict

RECIPES = {"safety": safety_tune, "compliance": compliance_tune}


def main() -> None:
    """Build the tune cold, print and write its stages, keep or compare its weights."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=BUNDLED_MODEL)
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="safety")
    ap.add_argument("--out", type=Path, default=None, help="stage timings as JSON")
    ap.add_argument("--weights", type=Path, default=None, help="keep the tuned weights here (safetensors)")
    ap.add_argument("--compare", type=Path, default=None, help="weights of another build to compare with")
    args = ap.parse_args()
    if any(cache_dir().glob("*.safetensors")):
        raise SystemExit(f"{cache_dir()} already holds tunes; point CNT_LENS_CACHE at an empty directory")
    print(f"cnt_lens from {Path(cnt_lens.__file__).parent}", flush=True)
    base = load_model(args.model)
    start = time.perf_counter()
    with profile() as timings:
        tuned = RECIPES[args.recipe](base)
    wall = time.perf_counter() - start
    print(timings.table())
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "recipe": args.recipe, "wall_s": wall,
                                        "timings": timings.to_dict()}, indent=1))
    weights = {k: v.detach().contiguous().clone() for k, v in hf_state_dict(tuned).items()}
    if args.weights:
        seen: set[int] = set()  # tied weights share storage: keep one name of each
        save_file({k: v for k, v in weights.items() if not (v.data_ptr() in seen or seen.add(v.data_ptr()))},
                  str(args.weights))
    if args.compare:
        other = load_file(str(args.compare))
        diffs = [((weights[k] - v).abs().max().item(), ((weights[k] - v).abs().max() / v.abs().max()).item())
                 for k, v in other.items()]
        print(f"against {args.compare}: max |difference| {max(d for d, _ in diffs):.3g}, "
              f"relative to the tensor's largest {max(r for _, r in diffs):.3g} ({len(diffs)} tensors)")


if __name__ == "__main__":
    main()
