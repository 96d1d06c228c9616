"""How much of an application's donor–target gap can a neuron transplant reach at all?

    python benchmarks/transplant_ceiling.py bias-removal [--split validation] [--alphas 1,2] [--device cuda]
        [--top 0.01 --top-alphas 8,16,24,32]
    (bias removal with --top: ~2.5 min on 2 cores once the debiasing tune is cached)

Builds the application's pair with its cached recipes and prints, one JSON line each, the
behaviour's and utility's numbers on ``--split`` for:

- ``target`` and ``donor``;
- ``all_mlp@α``: the target with **every** MLP neuron transplanted from the donor at scale α
  (the ceiling of any neuron selection, 100% of neurons);
- with ``--top F``: ``top F@α``, the top fraction ``F`` of one ``weight_attribution`` pass (train
  split, no utility penalty) at each of ``--top-alphas`` — how the scale trades against the budget;
- ``rest``: the target with every parameter *outside* the MLPs (attention, norms, embeddings)
  taken from the donor, MLPs kept — the share of the gap that no MLP neuron can carry.

If ``all_mlp@1`` does not close a gap that ``rest`` does, the behaviour the recipe installed lives
outside the MLPs and a minimal-neuron budget cannot meet a bar on it; the run's notes should say so.
"""

from __future__ import annotations

import argparse
import json

import torch

from cnt_lens import NeuronPatch, NeuronSelection, Utility, measure, score
from cnt_lens.experiments.applications import APPLICATIONS
from cnt_lens.models import BUNDLED_MODEL, clone_model, hf_state_dict, load_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("app", choices=sorted(APPLICATIONS))
    p.add_argument("--split", default="validation")
    p.add_argument("--alphas", default="1,2")
    p.add_argument("--top", type=float, default=None, help="also patch this top fraction of one scoring pass")
    p.add_argument("--top-alphas", default="8,16,24,32")
    p.add_argument("--device", default=None)
    args = p.parse_args()
    app = APPLICATIONS[args.app]
    pair = app.build(load_model(BUNDLED_MODEL, device=args.device))
    behaviours = [app.behaviour(), Utility()]

    def show(label: str, model) -> None:
        print(json.dumps({"app": args.app, "split": args.split, "model": label,
                          **measure(model, behaviours, args.split, batch_size=32, progress=False)}), flush=True)

    def sweep(label: str, selection: NeuronSelection, alphas: str) -> None:
        patch = NeuronPatch.from_pair(pair, selection)
        for alpha in (float(a) for a in alphas.split(",")):
            patched = patch.with_alpha(alpha)
            patched.apply(pair.target)
            show(f"{label}@{alpha:g}", pair.target)
            patched.revert(pair.target)

    show("target", pair.target)
    show("donor", pair.donor)
    sweep("all_mlp", NeuronSelection(torch.ones(pair.n_layers, pair.d_mlp, dtype=torch.bool), source="all"),
          args.alphas)
    if args.top is not None:
        sel = score(pair, behaviours[0], progress=False).top_fraction(args.top)
        sweep(f"top {args.top:g} ({sel.n} neurons)", sel, args.top_alphas)

    rest = clone_model(pair.target)
    donor_sd = hf_state_dict(pair.donor)
    outside = {k: t for k, t in hf_state_dict(rest).items() if ".mlp." not in k}
    with torch.no_grad():
        for k, t in outside.items():
            t.copy_(donor_sd[k])
    n = sum({t.data_ptr(): t.numel() for t in outside.values()}.values())  # tied embeddings counted once
    show(f"rest ({n / 1e6:.1f}M non-MLP params from donor)", rest)


if __name__ == "__main__":
    main()
