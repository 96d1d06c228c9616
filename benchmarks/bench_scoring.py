"""Scoring and transplant speed on the bundled SmolLM2-135M (CPU, or GPU with --device cuda).

    python benchmarks/bench_scoring.py [--prompts 16] [--batch 8] [--device cpu]

Prints, from one run on the same model and batch:
  * attribution time ÷ the plain-torch floor (one donor forward + one target forward and backward
    to the input embeddings, no hooks, the same positions unembedded), for both attribution kinds;
  * weight attribution unembedding every position ÷ only the metric's (``Behaviour.logits_to_keep``);
  * weight attribution running every row's chat-template prefix ÷ running it once per batch (the
    default; the floor runs every row's, so weight attribution can be below 1× of it);
  * exact weight-patching time per neuron ÷ attribution time per neuron;
  * apply + revert time of a 1% patch (vs a ~15-20 s reload);
  * peak RSS of attribution with N and 10N prompts (memory must stay flat: batches are summed).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from unittest import mock

import torch


def _setup(n_prompts: int, device: str):
    from cnt_lens import ModelPair, Refusal, load_model, load_prompts
    from cnt_lens.models import clone_model, read_neurons, write_neurons

    target = load_model("smollm2-135m-instruct", device=device)
    donor = clone_model(target)
    g = torch.Generator().manual_seed(0)
    for layer in range(target.cfg.n_layers):  # a donor that differs everywhere, like a fine-tune
        idx = torch.randperm(1536, generator=g)[:64]
        vals = read_neurons(donor, layer, idx)
        write_neurons(donor, layer, idx, {r: v + 0.01 * torch.randn_like(v) for r, v in vals.items()})
    harmful = load_prompts("harmful")
    beh = Refusal(harmful=harmful.take(n_prompts) if n_prompts <= len(harmful) else harmful)
    return ModelPair(donor=donor, target=target), beh


def _time(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def speed(args: argparse.Namespace) -> None:
    from cnt_lens import NeuronPatch, NeuronScores
    from cnt_lens.method.scoring import attribution, patching_effects
    from cnt_lens.method.scoring.attribution import attribution_scores

    pair, beh = _setup(args.prompts, args.device)
    batches = beh.batches(pair.tokenizer, None, args.batch)

    def floor() -> None:  # unembedding only the positions the metric reads, as the scorers do
        for b in batches:
            b = b.to(args.device)
            keep = beh.logits_to_keep(b)
            with torch.no_grad():
                pair.donor(b.tokens, logits_to_keep=keep, **b.model_kwargs())
            emb = pair.target.original_model.get_input_embeddings()(b.tokens).detach().requires_grad_(True)
            out = pair.target.original_model(inputs_embeds=emb, attention_mask=b.attention_mask,
                                             position_ids=b.position_ids, logits_to_keep=keep).logits
            beh.metric(out, b).sum().backward()

    t_floor = _time(floor)
    t_attr = {k: _time(lambda k=k: attribution_scores(pair, beh, batches, kind=k, progress=False)) for k in ("activation", "weight")}
    with mock.patch.object(type(beh), "logits_to_keep", lambda self, batch: 0):  # every position unembedded
        t_every = _time(lambda: attribution_scores(pair, beh, batches, kind="weight", progress=False))
    with mock.patch.object(attribution, "split_shared_prefix", lambda *a, **k: None):  # every row's prefix run
        t_unshared = _time(lambda: attribution_scores(pair, beh, batches, kind="weight", progress=False))
    n_exact = args.exact_neurons
    groups = torch.zeros(n_exact, pair.n_layers, pair.d_mlp, dtype=torch.bool)
    groups[torch.arange(n_exact), torch.arange(n_exact) % pair.n_layers, torch.arange(n_exact)] = True
    t_exact = _time(lambda: patching_effects(pair, beh, batches, groups, mode="weight", groups_per_pass=16,
                                             progress=False), repeats=1)
    sel = NeuronScores(torch.rand(pair.n_layers, pair.d_mlp), "random").top_fraction(0.01)
    patch = NeuronPatch.from_pair(pair, sel, alpha=2.0)
    t_patch = _time(lambda: (patch.apply(pair.target), patch.revert(pair.target)), repeats=10)
    per_neuron_attr = t_attr["weight"] / pair.n_neurons
    rows = {
        "prompts": len(beh.harmful), "batch": args.batch, "device": args.device, "threads": torch.get_num_threads(),
        "floor_s": round(t_floor, 3),
        "attribution_s": round(t_attr["activation"], 3), "attribution_over_floor": round(t_attr["activation"] / t_floor, 3),
        "weight_attribution_s": round(t_attr["weight"], 3),
        "weight_attribution_over_floor": round(t_attr["weight"] / t_floor, 3),
        "weight_attribution_every_position_over_kept": round(t_every / t_attr["weight"], 3),
        "weight_attribution_prefix_per_row_over_once": round(t_unshared / t_attr["weight"], 3),
        "exact_patching_s_per_neuron": round(t_exact / n_exact, 4),
        "exact_per_neuron_over_attribution_per_neuron": round((t_exact / n_exact) / per_neuron_attr, 1),
        "apply_plus_revert_1pct_ms": round(1000 * t_patch, 2),
    }
    print(json.dumps(rows, indent=1))


def memory(args: argparse.Namespace) -> None:
    import threading

    from cnt_lens.method.scoring.attribution import attribution_scores

    pair, beh = _setup(args.prompts, args.device)
    batches = beh.batches(pair.tokenizer, None, args.batch)
    page = resource.getpagesize()

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    before, peak, done = rss(), [0], threading.Event()

    def sample() -> None:  # model loading sets ru_maxrss, so sample RSS during attribution only
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.01)

    t = threading.Thread(target=sample)
    t.start()
    attribution_scores(pair, beh, batches, kind="weight", progress=False)
    done.set()
    t.join()
    print(json.dumps({"prompts": len(beh.harmful), "attribution_extra_rss_mb": round((peak[0] - before) / 2**20, 1)}))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--exact-neurons", type=int, default=32)
    p.add_argument("--memory", action="store_true", help="(internal) one memory measurement")
    a = p.parse_args()
    if a.memory:
        memory(a)
    else:
        speed(a)
        for n in (a.prompts, 10 * a.prompts):
            out = subprocess.run([sys.executable, __file__, "--memory", "--prompts", str(n), "--batch", str(a.batch),
                                  "--device", a.device], capture_output=True, text=True, check=True).stdout
            print(out.strip().splitlines()[-1])
