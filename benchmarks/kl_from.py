"""First-token KL of a run's models from either model of its pair, on the behaviour's test inputs.

    CNT_LENS_CACHE=… python benchmarks/kl_from.py RUN_DIR [--reference donor]

A run records KL(unedited target ‖ model). For a deletion (``disalign``: the target refuses, the donor is the
released model) the question is often how far the patch sits from the *released* model instead: this rebuilds the
run's pair (``cnt-lens run``'s application and model, from ``metrics.json``), applies ``patch.safetensors`` and
prints KL(``--reference`` ‖ model) for the target, the donor and the patched target, each with its bootstrap 95%
interval and n (the harmless test prompts for refusal, as the run reads them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from run_pair import rebuilt  # a sibling benchmark module

from cnt_lens import NeuronPatch
from cnt_lens.method.divergence import KL_NAME, first_token_kl, next_token_logprobs


def main() -> None:
    """Print one line per model."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--reference", choices=("donor", "target"), default="donor")
    args = ap.parse_args()
    _, config, _, pair, behaviour = rebuilt(args.run_dir)  # the run's pair and prompts
    about = config.about
    batches = behaviour.kl_batches(pair.tokenizer, "test", 64)
    reference = next_token_logprobs(getattr(pair, args.reference), batches)
    patch = NeuronPatch.load(args.run_dir / "patch.safetensors", pair.target)
    print(f"KL({args.reference} ‖ model) at the first answer token, {about['application']}, {about['model']}:")
    for name in ("target", "donor", "patched"):
        model = pair.donor if name == "donor" else pair.target
        if name == "patched":
            with patch.applied(pair.target):
                kl = first_token_kl(model, reference, batches)
        else:
            kl = first_token_kl(model, reference, batches)
        lo, hi = kl[f"{KL_NAME}_ci95"]
        print(f"  {name:8s} {kl[KL_NAME]:.3f} [{lo:.3f}, {hi:.3f}] n={kl[f'{KL_NAME}_n']}")


if __name__ == "__main__":
    main()
