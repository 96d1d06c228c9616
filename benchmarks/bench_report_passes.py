"""The report's two model passes on a finished run: the neuron cards and the neuron browser, timed.

    python benchmarks/bench_report_passes.py RUN [--model NAME] [--out passes.json]

Recomputes ``cards.json``'s neurons (:func:`~cnt_lens.show.inspector.neurons_stats` on the test split) and
``neurons.html``'s data (:func:`~cnt_lens.show.neuron_browser.browser_data` with the run's patch and answers)
for ``RUN`` (a ``cnt-lens run`` or ``demo`` directory) and prints the seconds of each. Both models are the
run's base model loaded twice: the cost is forward passes, which do not depend on the weights, so no donor
is built. ``--out`` keeps the data, so two commits (each run from its own checkout with ``PYTHONPATH``) can be
compared number for number.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cnt_lens
from cnt_lens import ModelPair, NeuronPatch, Refusal, load_model
from cnt_lens.models.hf import clone_model
from cnt_lens.show.inspector import neurons_stats
from cnt_lens.show.neuron_browser import browser_data, texts_from_items


def main() -> None:
    """Time the cards' and the browser's passes on the run's neurons."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--model", default=None, help="the run's model (default: metrics.json's about.model)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    for name in ("metrics.json", "patch.safetensors", "cards.json", "items.jsonl"):
        if not (args.run / name).is_file():
            raise SystemExit(f"{args.run}: no {name} there (give a finished run directory)")
    about = json.loads((args.run / "metrics.json").read_text())["extra"]["config"].get("about", {})
    model = args.model or about.get("model")
    if not model:
        raise SystemExit(f"{args.run}/metrics.json names no model (extra.config.about.model): give --model")
    print(f"cnt_lens from {Path(cnt_lens.__file__).parent}", flush=True)
    base = load_model(model)
    pair = ModelPair(donor=clone_model(base), target=base)
    patch = NeuronPatch.load(args.run / "patch.safetensors", pair.target)
    neurons = [(c["layer"], c["neuron"]) for c in json.loads((args.run / "cards.json").read_text())]
    rows = [json.loads(line) for line in (args.run / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    start = time.perf_counter()
    cards = neurons_stats(pair, neurons, Refusal(), split="test")
    cards_s = time.perf_counter() - start
    start = time.perf_counter()
    browser = browser_data(pair, Refusal(), patch, texts=texts_from_items(rows, pair.tokenizer))
    browser_s = time.perf_counter() - start
    print(f"{model}: neuron cards ({len(neurons)}) {cards_s:.1f} s, neuron browser ({patch.selection.n} neurons) "
          f"{browser_s:.1f} s")
    if args.out:
        args.out.write_text(json.dumps({"cards_s": cards_s, "browser_s": browser_s, "cards": cards,
                                        "browser": browser}))


if __name__ == "__main__":
    main()
