"""Scoring at real model sizes: random-init Llama-shaped pairs, attribution ÷ the raw floor, TFLOP/s, memory.

    python benchmarks/bench_scale.py --sizes 1b,3b,8b                      # one GPU, bf16
    python benchmarks/bench_scale.py --sizes tiny,135m --device cpu        # the CPU-side figures
    python benchmarks/bench_scale.py --sizes 8b --placed 0.5               # half the target's layers on the CPU,
                                                                           # the donor streamed from its files

Each size builds a target with random weights (Llama shapes: layers, d_model, d_mlp, heads, KV heads,
vocabulary) and a donor that differs from it in 1% of the MLP neurons of every layer, both wrapped by
:func:`cnt_lens.load_model`. The behaviour is the log-probability of one token at the last position
of random token sequences (``--batch`` × ``--seq``, ``--batches`` of them): shapes, not meaning, set
the cost. Printed per size, as one JSON line:

* ``floor_s``: one donor forward plus one target forward and backward to the input embeddings on the
  plain HF modules, no hooks (what any attribution must at least pay);
* ``attribution_over_floor`` and ``weight_attribution_over_floor``: :func:`cnt_lens.score` time ÷ floor;
* ``tflops``: the floor's matrix-multiply FLOPs (6 · matmul parameters · tokens: donor forward 2,
  target forward 2 and backward to the activations 2) ÷ weight attribution's time;
* ``peak_gib``: the most device memory allocated during weight attribution (CUDA), or the process's
  peak RSS (CPU);
* ``apply_revert_ms``: apply + revert of a 1% patch.

With ``--placed F`` the target is exported and reloaded with a ``device_map`` that keeps the first
``1 − F`` of its layers on the device and puts the rest on the CPU (accelerate moves them per forward;
on a CPU-only machine, on disk), and the donor is a :class:`cnt_lens.StreamedDonor` over its exported
files; the line then also reports ``streamed_peak_mb`` (donor bytes alive at once). Checkpoints are
written under ``--workdir`` (≈ 2 × the pair's size on disk).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

#: layers, d_model, d_mlp, attention heads, KV heads, vocabulary (Llama 3.2-1B/3B and 3.1-8B; SmolLM2-135M).
SHAPES: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (4, 256, 1024, 8, 4, 4096),
    "135m": (30, 576, 1536, 9, 3, 49152),
    "1b": (16, 2048, 8192, 32, 8, 128256),
    "3b": (28, 3072, 8192, 24, 8, 128256),
    "8b": (32, 4096, 14336, 32, 8, 128256),
}


def hf_llama(size: str, dtype: torch.dtype, device: str, seed: int) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` of the named shape (small init, so bf16 stays finite)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    n_layers, d_model, d_mlp, heads, kv, vocab = SHAPES[size]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      initializer_range=0.02, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def random_token_behaviour(vocab: int, n_batches: int, batch: int, seq: int) -> Any:
    """A :class:`cnt_lens.Behaviour` over fixed random token sequences: log p(token 1) at the last position."""
    from cnt_lens.behaviours import Behaviour
    from cnt_lens.data import Batch

    g = torch.Generator().manual_seed(0)
    fixed = [Batch(torch.randint(2, vocab, (batch, seq), generator=g), torch.ones(batch, seq, dtype=torch.long),
                   torch.arange(seq).expand(batch, seq).contiguous()) for _ in range(n_batches)]

    class RandomTokens(Behaviour):
        name = "random_tokens"
        toward = 1.0

        def batches(self, tokenizer: Any, split: str | None, batch_size: int) -> list[Batch]:
            return fixed

        def metric(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
            return logits[:, -1].float().log_softmax(-1)[:, 1]

        def evaluate_items(self, model: Any, split: str | None, **_: Any) -> list[dict[str, Any]]:
            return [{"metric": v} for v in self.metric_items(model, fixed)]

        def aggregate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
            return {"metric": sum(i["metric"] for i in items) / len(items)}

    return RandomTokens()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Any, device: str, repeats: int) -> float:
    """Best of ``repeats`` wall times of ``fn()`` after one warm-up call, in seconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def _peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _matmul_params(hf: Any) -> int:
    """Parameters that enter a matrix multiply per token (everything but the input embedding and norms)."""
    return sum(p.numel() for n, p in hf.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)


def _donor_differing(target_hf: Any, fraction: float, seed: int) -> Any:
    """A copy of ``target_hf`` whose MLPs differ in ``fraction`` of each layer's neurons (like a fine-tune)."""
    import copy

    donor = copy.deepcopy(target_hf)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in donor.model.layers:
            d_mlp = layer.mlp.up_proj.weight.shape[0]
            idx = torch.randperm(d_mlp, generator=g)[: max(1, int(fraction * d_mlp))].to(layer.mlp.up_proj.weight.device)
            for w, axis in ((layer.mlp.gate_proj.weight, 0), (layer.mlp.up_proj.weight, 0), (layer.mlp.down_proj.weight, 1)):
                rows = w.index_select(axis, idx)
                w.index_copy_(axis, idx, rows + 0.02 * torch.randn_like(rows))
    return donor


def _placement(n_layers: int, placed: float, device: str) -> dict[str, str]:
    """A ``device_map``: the first layers on ``device``, the last ``placed`` share off it."""
    off = "cpu" if device.startswith("cuda") else "disk"
    device = 0 if device == "cuda" else device  # accelerate names GPUs by index
    first_off = n_layers - round(placed * n_layers)
    layers = {f"model.layers.{i}": (device if i < first_off else off) for i in range(n_layers)}
    return {"model.embed_tokens": device, "model.rotary_emb": device, **layers, "model.norm": device, "lm_head": device}


def measure(size: str, args: argparse.Namespace) -> dict[str, Any]:
    """One size's figures (see the module docstring)."""
    from cnt_lens import ModelPair, NeuronPatch, NeuronScores, StreamedDonor, export_hf, load_model, score
    from cnt_lens.workflow.testing import tiny_tokenizer

    dtype = getattr(torch, args.dtype)
    device = args.device
    tok = tiny_tokenizer()  # only its pad/eos ids are read: the behaviour brings its own token ids
    target_hf = hf_llama(size, dtype, device, seed=0)
    donor_hf = _donor_differing(target_hf, 0.01, seed=1)
    n_layers, vocab = SHAPES[size][0], SHAPES[size][5]
    beh = random_token_behaviour(vocab, args.batches, args.batch, args.seq)
    batches = [b.to(device) for b in beh.batches(None, None, args.batch)]
    row: dict[str, Any] = {"size": size, "device": device, "dtype": args.dtype, "tokens": args.batches * args.batch * args.seq,
                           "params_b": round(sum(p.numel() for p in target_hf.parameters()) / 1e9, 3)}

    def floor() -> None:
        for b in batches:
            with torch.no_grad():
                donor_hf(b.tokens, attention_mask=b.attention_mask, position_ids=b.position_ids)
            emb = target_hf.get_input_embeddings()(b.tokens).detach().requires_grad_(True)
            out = target_hf(inputs_embeds=emb, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
            beh.metric(out, b).sum().backward()

    row["floor_s"] = _timed(floor, device, args.repeats)
    work = tempfile.TemporaryDirectory(dir=args.workdir)
    if args.placed:
        export_hf(load_model(donor_hf, tokenizer=tok), Path(work.name) / "donor")
        export_hf(load_model(target_hf, tokenizer=tok), Path(work.name) / "target")
        del donor_hf, target_hf
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        target = load_model(str(Path(work.name) / "target"), dtype=dtype,
                            device_map=_placement(n_layers, args.placed, device), offload_folder=Path(work.name) / "off")
        pair = ModelPair(donor=StreamedDonor(Path(work.name) / "donor", target=target), target=target)
        kinds = ["weight"]
    else:
        pair = ModelPair(donor=load_model(donor_hf, tokenizer=tok), target=load_model(target_hf, tokenizer=tok))
        kinds = ["activation", "weight"]
    row["placed_off_device"] = args.placed
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for kind in kinds:
        method = "weight_attribution" if kind == "weight" else "attribution"
        t = _timed(lambda m=method: score(pair, beh, m, progress=False, batch_size=args.batch), device, args.repeats)
        row[f"{method}_s"] = round(t, 3)
        row[f"{method}_over_floor"] = round(t / row["floor_s"], 3)
    flops = 6 * _matmul_params(pair.target.original_model) * row["tokens"]
    row["tflops"] = round(flops / row["weight_attribution_s"] / 1e12, 3)
    row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else _peak_rss_gib(), 2)
    if args.placed:
        row["streamed_peak_mb"] = round(pair.donor.peak_bytes / 2**20, 1)
    n_neurons = n_layers * SHAPES[size][2]
    sel = NeuronScores(torch.rand(n_layers, SHAPES[size][2]), "random").top_k(n_neurons // 100)
    patch = NeuronPatch.from_pair(pair, sel, alpha=2.0)
    row["apply_revert_ms"] = round(1000 * _timed(lambda: (patch.apply(pair.target), patch.revert(pair.target)),
                                                 device, 5), 2)
    row["floor_s"] = round(row["floor_s"], 3)
    work.cleanup()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1b,3b,8b", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU unless given")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--placed", type=float, default=0.0,
                    help="share of the target's layers placed off the device (0: both models whole on it)")
    ap.add_argument("--workdir", default=None, help="where --placed writes the pair's checkpoints (default: temp)")
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    unknown = [s for s in args.sizes.split(",") if s not in SHAPES]
    if unknown:
        ap.error(f"unknown size(s) {unknown}; one of {list(SHAPES)}")
    if not 0 <= args.placed < 1:
        ap.error("--placed is a share of the layers, 0 ≤ F < 1")
    for size in args.sizes.split(","):
        print(json.dumps(measure(size, args)), flush=True)


if __name__ == "__main__":
    main()
