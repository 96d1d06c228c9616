"""Greedy answers at several batch widths: seconds, and whether the answers are the same at every width.

    python benchmarks/bench_generation_width.py [--model smollm2-135m-instruct] [--widths 16,128] [--rounds 2]
        [--set harmless] [--split train] [--tokens 40]

The prompts a recipe self-distils by default (``safety_tune``: the harmless train split, 40 new tokens), in
chat format, answered by :func:`~cnt_lens.behaviours.generate` at each width of ``--widths``, the widths
alternating for ``--rounds`` rounds so machine noise hits each. A decoding step has a fixed cost that a narrow
batch does not cover; left padding with explicit positions keeps each answer its prompt's own, so the widths
can differ only where two tokens tie to float rounding — the last line counts the answers that differ.
"""

from __future__ import annotations

import argparse
import time

from cnt_lens import BUNDLED_MODEL, load_model, load_prompts
from cnt_lens.behaviours.generation import generate
from cnt_lens.data.tokens import chat_format


def main() -> None:
    """Answer the prompts at each width, alternately; print seconds and the answers that differ."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=BUNDLED_MODEL)
    ap.add_argument("--widths", default="16,128")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--set", default="harmless", help="a bundled prompt set")
    ap.add_argument("--split", default="train")
    ap.add_argument("--tokens", type=int, default=40)
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    model = load_model(args.model)
    prompts = [chat_format(model.tokenizer, p) for p in load_prompts(args.set).split(args.split).column("prompt")]
    answers: dict[int, list[str]] = {}
    for r in range(args.rounds):
        for width in widths:
            start = time.perf_counter()
            answers[width] = generate(model, prompts, max_new_tokens=args.tokens, batch_size=width, progress=False)
            print(f"round {r + 1}, width {width}: {time.perf_counter() - start:.1f} s", flush=True)
    first = answers[widths[0]]
    for width in widths[1:]:
        differ = sum(a != b for a, b in zip(first, answers[width]))
        print(f"{args.model}, {len(prompts)} prompts ({args.set}, {args.split}), {args.tokens} tokens: width {width} "
              f"gives {differ} answers different from width {widths[0]}'s")


if __name__ == "__main__":
    main()
