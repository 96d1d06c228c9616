"""How much of an application's donor–target gap can a neuron transplant reach at all?

    python benchmarks/transplant_ceiling.py bias-removal [--split validation] [--alphas 1,2] [--device cuda]
        [--top 0.01 --top-alphas 8,16,24,32] [--methods weight_attribution,attribution]
        [--model qwen2.5-coder-0.5b-instruct] [--no-ceiling] [--skip-target]
    (bias removal with --top: ~2.5 min on 2 cores once the debiasing tune is cached)

Builds the application's pair with its cached recipes and prints, one JSON line each, the
behaviour's and utility's numbers on ``--split`` for:

- ``target`` and ``donor``;
- ``all_mlp@α``: the target with **every** MLP neuron transplanted from the donor at scale α
  (the ceiling of any neuron selection, 100% of neurons);
- with ``--top F``: ``top F@α``, the top fraction ``F`` of one pass of each of ``--methods`` (train
  split, no utility penalty) at each of ``--top-alphas`` — how the scale trades against the budget;
- ``rest``: the target with every parameter *outside* the MLPs (attention, norms, embeddings)
  taken from the donor, MLPs kept — the share of the gap that no MLP neuron can carry.

``--no-ceiling`` skips ``all_mlp`` and ``rest`` (a fixed-budget comparison of rankings only);
``--skip-target`` skips the target's row (when its numbers on the split are already known).

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
    p.add_argument("--methods", default="weight_attribution")
    p.add_argument("--model", default=BUNDLED_MODEL, help="base model the application's recipes tune")
    p.add_argument("--no-ceiling", action="store_true")
    p.add_argument("--skip-target", action="store_true")
    p.add_argument("--device", default=None)
    args = p.parse_args()
    app = APPLICATIONS[args.app]
    pair = app.build(load_model(args.model, device=args.device))
    behaviours = [app.behaviour(), Utility()]

    def show(label: str, model) -> None:
        print(json.dumps({"app": args.app, "base": args.model, "split": args.split, "model": label,
                          **measure(model, behaviours, args.split, batch_size=32, progress=False)}), flush=True)

    def sweep(label: str, selection: NeuronSelection, alphas: str) -> None:
        patch = NeuronPatch.from_pair(pair, selection)
        for alpha in (float(a) for a in alphas.split(",")):
            with patch.with_alpha(alpha).applied(pair.target):
                show(f"{label}@{alpha:g}", pair.target)

    if not args.skip_target:
        show("target", pair.target)
    show("donor", pair.donor)
    if not args.no_ceiling:
        sweep("all_mlp", NeuronSelection(torch.ones(pair.n_layers, pair.d_mlp, dtype=torch.bool), source="all"),
              args.alphas)
    for method in args.methods.split(",") if args.top is not None else []:
        sel = score(pair, behaviours[0], method, progress=False).top_fraction(args.top)
        per_layer = sel.per_layer()
        print(json.dumps({"method": method, "neurons": sel.n, "layers_holding_half": _half(per_layer),
                          "per_layer": per_layer}), flush=True)
        sweep(f"{method} top {args.top:g} ({sel.n} neurons)", sel, args.top_alphas)
    if args.no_ceiling:
        return

    rest = clone_model(pair.target)
    donor_sd = hf_state_dict(pair.donor)
    outside = {k: t for k, t in hf_state_dict(rest).items() if ".mlp." not in k}
    with torch.no_grad():
        for k, t in outside.items():
            t.copy_(donor_sd[k])
    n = sum({t.data_ptr(): t.numel() for t in outside.values()}.values())  # tied embeddings counted once
    show(f"rest ({n / 1e6:.1f}M non-MLP params from donor)", rest)


def _half(per_layer: list[int]) -> list[int]:
    """The fewest layers (largest counts first) that hold half of the selected neurons."""
    order = sorted(range(len(per_layer)), key=lambda i: -per_layer[i])
    total, seen, out = sum(per_layer), 0, []
    for i in order:
        if seen * 2 >= total:
            break
        out.append(i)
        seen += per_layer[i]
    return sorted(out)


if __name__ == "__main__":
    main()
