"""Refusal evaluations under two batch layouts: seconds, and whether the answers are the same.

    CNT_LENS_CACHE=… python benchmarks/bench_batching.py [--splits validation,test] [--patch RUN/patch.safetensors]
        [--batch-sizes 32,64] [--decided]

The demo's pair (the bundled SmolLM2 and its cached safety tune; the tune is trained first if the cache
lacks it) and, with ``--patch``, the target with a run's patch applied. For each model and split, the
refusal evaluation's greedy answers (harmful and harmless prompts, 48 new tokens; ``--decided``: each
stopped once its verdict is final, as searches and baselines generate) two ways:

- ``apart``: one :func:`~cnt_lens.behaviours.generate` call per prompt set at batch 32;
- ``one call @ B``: both sets in one call (what ``Refusal`` runs), length-sorted batches of ``B`` rows,
  for each ``B`` of ``--batch-sizes``.

Batching changes nothing but float rounding (each row's logits are its own prompt's), so an answer can
differ only where two tokens tie to rounding. Prints seconds, the ratio to ``apart`` and how many
answers (texts) and verdicts are the same as ``apart``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any, Callable

from cnt_lens import BUNDLED_MODEL, ModelPair, NeuronPatch, Refusal, load_model
from cnt_lens.behaviours import generate
from cnt_lens.behaviours.judge import is_refusal, verdict_is_final
from cnt_lens.data import chat_format
from cnt_lens.experiments.recipes import safety_tune
from cnt_lens.models import model_tokenizer


def _timed(run: Callable[[], list[str]]) -> tuple[list[str], float]:
    t = time.perf_counter()
    out = run()
    return out, time.perf_counter() - t


def main() -> None:
    """One row per model, split and layout."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", default="validation,test")
    ap.add_argument("--patch", default=None, help="a run's patch.safetensors: also the target with it applied")
    ap.add_argument("--batch-sizes", default="32,64")
    ap.add_argument("--decided", action="store_true", help="stop each answer at its verdict (searches' way)")
    args = ap.parse_args()
    base = load_model(BUNDLED_MODEL)
    pair = ModelPair(donor=safety_tune(base), target=base)
    behaviour = Refusal()
    tok = model_tokenizer(base)
    until = verdict_is_final if args.decided else None
    models: dict[str, tuple[Any, NeuronPatch | None]] = {"target": (pair.target, None), "donor": (pair.donor, None)}
    if args.patch:
        models["patched"] = (pair.target, NeuronPatch.load(args.patch))
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    totals: dict[str, float] = {}
    print("| model | split | n | layout | s | ÷ apart | answers as apart | verdicts as apart |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (model, patch) in models.items():
        with contextlib.nullcontext() if patch is None else patch.applied(model):
            for split in args.splits.split(","):
                sets = [[chat_format(tok, p) for p in ps.split(split).column("prompt")]
                        for ps in (behaviour.harmful, behaviour.harmless)]
                kw: dict[str, Any] = dict(max_new_tokens=behaviour.max_new_tokens, progress=False, until=until)
                apart, t0 = _timed(lambda: [a for s in sets for a in generate(model, s, batch_size=32, **kw)])
                rows = [("apart @ 32", apart, t0)]
                for b in sizes:
                    one, t = _timed(lambda: generate(model, sets[0] + sets[1], batch_size=b, **kw))
                    rows.append((f"one call @ {b}", one, t))
                for layout, answers, t in rows:
                    same = sum(a == x for a, x in zip(answers, apart))
                    verdicts = sum(is_refusal(a) == is_refusal(x) for a, x in zip(answers, apart))
                    totals[layout] = totals.get(layout, 0.0) + t
                    print(f"| {name} | {split} | {len(answers)} | {layout} | {t:.1f} | {t0 / t:.2f}× | "
                          f"{same}/{len(answers)} | {verdicts}/{len(answers)} |", flush=True)
    first = totals["apart @ 32"]
    print("all: " + ", ".join(f"{k} {v:.1f} s ({first / v:.2f}×)" for k, v in totals.items()))


if __name__ == "__main__":
    main()
