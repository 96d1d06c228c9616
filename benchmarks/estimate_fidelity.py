"""How well does the screened search's estimate read a run's patch? Estimate against evaluation, per alpha.

    python benchmarks/estimate_fidelity.py runs/cross-continuation [--alphas 2,4,6,8] [--split validation]

Rebuilds the run's target (its application's cached recipes; ``metrics.json`` names the application,
model and prompt protocol), applies ``patch.safetensors`` at each alpha and reads the refusal rates
three ways on ``--split``: the evaluation (48 greedy tokens, judged), the estimate
(:meth:`cnt_lens.Refusal.estimate_items`: the judge on the first ``estimate_tokens``), and the
former one-pass estimate (the opening's log-odds > 0, :meth:`cnt_lens.Refusal.metric` without a
continuation). Prints each rate, the share of prompts on which each estimate agrees with the
evaluation, and each reading's seconds. Validation by default: this is what the search decides on.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from cnt_lens import NeuronPatch, Refusal, load_model
from cnt_lens.experiments.applications import APPLICATIONS, PROTOCOLS
from cnt_lens.method.config import TransferConfig
from cnt_lens.models import model_tokenizer


def _timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _one_pass(behaviour: Refusal, model: Any, split: str) -> list[bool]:
    """The former estimate: the refusal opening more likely than not, harmful then harmless prompts."""
    opening = replace(behaviour, continuation="")
    tok = model_tokenizer(model)
    batches = opening.batches(tok, split, 32) + opening.control_batches(tok, split, 32)
    return [lo > 0 for lo in opening.metric_items(model, batches)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--alphas", default=None, help="comma-separated (default: the run's chosen alpha)")
    ap.add_argument("--split", default="validation")
    args = ap.parse_args()
    metrics = json.loads((args.run / "metrics.json").read_text())
    extra = metrics["extra"]
    app = APPLICATIONS[TransferConfig.from_dict(extra["config"]).about["application"]]
    behaviour = PROTOCOLS[extra.get("protocol", "split")](app.behaviour())
    if not isinstance(behaviour, Refusal):
        raise SystemExit(f"{args.run}: {behaviour.name!r} has no screened estimate to check (refusal runs only)")
    target = getattr(app.build(load_model(TransferConfig.from_dict(extra["config"]).about["model"])), "target")
    patch = NeuronPatch.load(args.run / "patch.safetensors", target)
    alphas = [float(a) for a in args.alphas.split(",")] if args.alphas else [patch.alpha]
    for alpha in alphas:
        with patch.with_alpha(alpha).applied(target):
            full, t_full = _timed(lambda: behaviour.evaluate_items(target, args.split, batch_size=32, progress=False))
            est, t_est = _timed(lambda: behaviour.estimate_items(target, args.split, batch_size=32, progress=False))
            old, t_old = _timed(lambda: _one_pass(behaviour, target, args.split))
        row: dict[str, Any] = {"k": patch.n, "alpha": alpha, "split": args.split, "n": len(full)}
        for name, flags, secs in (("evaluation", [i["refused"] for i in full], t_full),
                                  ("estimate", [i["refused"] for i in est], t_est), ("one_pass", old, t_old)):
            agg = behaviour.aggregate([{**i, "refused": f} for i, f in zip(full, flags)])
            row[name] = {"harmful": round(agg["refusal_harmful"], 3), "harmless": round(agg["refusal_harmless"], 3),
                         "agrees": round(sum(f == i["refused"] for f, i in zip(flags, full)) / len(full), 3),
                         "seconds": round(secs, 1)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
