"""Peak memory and time of weight attribution with the donor loaded whole vs streamed from its files.

    python benchmarks/bench_streamed.py [--prompts 16] [--batch 8]

The target is the bundled SmolLM2-135M (fp32); the donor is a perturbed copy (64 neurons a layer
moved, like a fine-tune) saved as a safetensors checkpoint. Each mode runs in a fresh process
(RSS after loading, then the peak while scoring, from /proc): ``target`` (the target alone, one weight-attribution-sized
forward/backward with no donor: the floor), ``whole`` (donor loaded with ``load_model``) and
``streamed`` (donor read layer by layer by ``StreamedDonor``). Prints peak RSS, the scores'
largest difference between the two donors, and time ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _target_and_behaviour(n_prompts: int):
    from cnt_lens import Refusal, load_model, load_prompts

    target = load_model("smollm2-135m-instruct")
    return target, Refusal(harmful=load_prompts("harmful").take(n_prompts), toward=1.0)


def make_donor(path: Path) -> None:
    """A perturbed copy of the bundled model, saved with export_hf (safetensors)."""
    from cnt_lens import export_hf
    from cnt_lens.models import clone_model, read_neurons, write_neurons

    target, _ = _target_and_behaviour(1)
    donor = clone_model(target)
    g = torch.Generator().manual_seed(0)
    for layer in range(target.cfg.n_layers):
        idx = torch.randperm(int(target.cfg.d_mlp), generator=g)[:64]
        vals = read_neurons(donor, layer, idx)
        write_neurons(donor, layer, idx, {r: v + 0.05 * torch.randn(v.shape, generator=g) for r, v in vals.items()})
    export_hf(donor, path)


def _rss_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, from /proc, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM to the current RSS)."""
    Path("/proc/self/clear_refs").write_text("5")


def run_mode(mode: str, ckpt: Path, n_prompts: int, batch: int, out: Path) -> None:
    """One measurement in this process; writes its numbers (and scores) next to ``out``."""
    from cnt_lens import ModelPair, StreamedDonor, load_model
    from cnt_lens.method.scoring.attribution import attribution_scores
    from cnt_lens.models import model_tokenizer

    t0 = time.perf_counter()
    target, beh = _target_and_behaviour(n_prompts)
    batches = beh.batches(model_tokenizer(target), None, batch)
    if mode == "target":
        from cnt_lens.method.scoring.common import forward

        loaded_mb = _rss_mb("VmRSS")
        _reset_peak()
        t1 = time.perf_counter()
        for b in batches:
            with torch.enable_grad():
                emb = ("hook_embed", lambda x, hook: x.detach().requires_grad_(True))
                beh.metric(forward(target, b, [emb]), b).sum().backward()
        info = {"seconds": time.perf_counter() - t1}
    else:
        donor = load_model(str(ckpt)) if mode == "whole" else StreamedDonor(ckpt, target=target)
        pair = ModelPair(donor=donor, target=target)
        loaded_mb = _rss_mb("VmRSS")
        _reset_peak()
        t1 = time.perf_counter()
        values, _, _ = attribution_scores(pair, beh, batches, kind="weight", progress=False)
        info = {"seconds": time.perf_counter() - t1}
        torch.save(values, out.with_suffix(".pt"))
        if mode == "streamed":
            info["donor_peak_bytes"] = donor.peak_bytes
    info.update(mode=mode, load_s=t1 - t0, loaded_rss_mb=loaded_mb, peak_rss_mb=_rss_mb("VmHWM"))
    out.write_text(json.dumps(info))


def main() -> None:
    """Make the donor checkpoint once, run each mode in a fresh process, print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--mode", choices=["target", "whole", "streamed"], help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        run_mode(args.mode, args.ckpt, args.prompts, args.batch, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "donor"
        make_donor(ckpt)
        res = {}
        for mode in ("target", "whole", "streamed"):
            out = Path(tmp) / f"{mode}.json"
            subprocess.run([sys.executable, __file__, "--mode", mode, "--ckpt", str(ckpt), "--out", str(out),
                            "--prompts", str(args.prompts), "--batch", str(args.batch)], check=True)
            res[mode] = json.loads(out.read_text())
        diff = (torch.load(Path(tmp) / "whole.pt") - torch.load(Path(tmp) / "streamed.pt")).abs().max().item()
        scale = torch.load(Path(tmp) / "whole.pt").abs().max().item()
        donor_mb = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**20
    print(f"weight attribution, {args.prompts} prompts, batch {args.batch}; donor checkpoint {donor_mb:.0f} MB")
    print(f"{'mode':<10} {'RSS loaded MB':>14} {'peak scoring MB':>16} {'scoring s':>10} {'load s':>8}")
    for mode, r in res.items():
        print(f"{mode:<10} {r['loaded_rss_mb']:>14.0f} {r['peak_rss_mb']:>16.0f} {r['seconds']:>10.1f} {r['load_s']:>8.1f}")
    w, s, t = res["whole"], res["streamed"], res["target"]
    print(f"streamed − target-only RSS: {s['peak_rss_mb'] - t['peak_rss_mb']:.0f} MB "
          f"(whole − target-only: {w['peak_rss_mb'] - t['peak_rss_mb']:.0f} MB); "
          f"donor bytes alive at once: {s['donor_peak_bytes'] / 2**20:.1f} MB")
    print(f"streamed ÷ whole scoring time: {s['seconds'] / w['seconds']:.2f}; "
          f"largest score difference {diff:.2e} (largest score {scale:.2e})")


if __name__ == "__main__":
    main()
