"""How the tokens of a scoring pass divide: real, padding, and the prefix every prompt of a batch shares.

    python benchmarks/scored_tokens.py [--split train] [--batch-size 8]

For the demo's refusal prompts (harmful, and the harmless control prompts of the contrast) as the scorers
batch them: the real tokens, the padding, and the tokens of the longest prefix every row of a batch starts
with (a chat template's system prompt). Those prefix tokens are computed identically for every row of a
batch; a scoring pass that ran them once per batch (as generation does) would do that share less work.
"""

from __future__ import annotations

import argparse

from cnt_lens import BUNDLED_MODEL, Refusal, load_model
from cnt_lens.data import shared_prefix_length
from cnt_lens.models import model_tokenizer


def main() -> None:
    """One line per prompt set."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="train")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    tok = model_tokenizer(load_model(BUNDLED_MODEL))
    refusal = Refusal()
    sets = {"harmful": refusal.batches(tok, args.split, args.batch_size),
            "harmless (control)": refusal.control_batches(tok, args.split, args.batch_size)}
    for name, batches in sets.items():
        real = sum(int(b.attention_mask.sum()) for b in batches)
        width = sum(b.tokens.numel() for b in batches)
        shared = sum(shared_prefix_length(b) * len(b) for b in batches)
        once = sum(shared_prefix_length(b) * (len(b) - 1) for b in batches)
        print(f"{name}: {len(batches)} batches, {real} real tokens, padding {1 - real / width:.0%} of the width, "
              f"shared prefix {shared / real:.0%} of the real tokens (run once per batch: {once / real:.0%} fewer)")


if __name__ == "__main__":
    main()
