"""A whole run on a planted pair, pinned: ``metrics.json`` and ``frontier.json`` must not move under a refactor.

The run covers the paths a refactor of the settings and the run directory touches: re-scoring rounds
with a contrast and a preserved side effect, the screened search, three baselines (each with its own
minimal set) and the random baseline's seeds. The pinned files were written by the code as it was
before ``TransferConfig`` became nested (``python tests/test_transfer_pin.py --write`` rewrites them;
do that only for an intended change of the numbers, and say so in the commit). What describes the
run rather than its numbers (the settings, wall time, device) is left out of the comparison.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from cnt_lens import Utility
from cnt_lens.workflow.testing import EstimatedMarker, planted_pair

PINNED = Path(__file__).parent / "data" / "transfer_pin"
#: keys of ``metrics.json``'s ``extra`` that describe the run, not its numbers
DESCRIPTIVE = ("config", "ranking", "wall_time_s", "device", "constraint", "data")


def run(out: Path) -> dict[str, Any]:
    """The pinned run's two files, read back (``extra``'s descriptive keys dropped)."""
    from cnt_lens.method.config import TransferConfig, override
    from cnt_lens.workflow.runs import run_transfer

    pair, behaviour, _ = planted_pair("llama", n_planted=8, seed=2)
    config = override(TransferConfig(), {"baselines.methods": ("attribution", "weight_diff", "random"), "search.alphas": (1.0, 2.0), "search.max_fraction": 0.5, "baselines.random_seeds": 2, "search.batch_size": 16, "evaluation.batch_size": 16, "ranking.rounds": 2,
                                          "ranking.round_alpha": 2.0, "ranking.contrast": 0.5,
                                          "ranking.preserve_weights": (3.0,), "search.screen": True})
    run_transfer(pair, behaviour, out, config, side_effects=[Utility()], progress=False)
    # the screened search: a behaviour with cheap estimates, on the other architecture
    pair, _, _ = planted_pair("gpt2", n_planted=8, seed=2)
    config = override(TransferConfig(), {"baselines.methods": ("random",), "search.alphas": (1.0, 2.0), "search.max_fraction": 0.5, "baselines.random_seeds": 1, "search.batch_size": 16, "evaluation.batch_size": 16,
                                          "search.screen": True})
    run_transfer(pair, EstimatedMarker(), out / "screened", config, side_effects=[Utility()], progress=False)
    files = {}
    for name, where in (("", out), ("screened_", out / "screened")):
        metrics = json.loads((where / "metrics.json").read_text())
        metrics["extra"] = {k: v for k, v in metrics["extra"].items() if k not in DESCRIPTIVE}
        files.update({f"{name}metrics": metrics, f"{name}frontier": json.loads((where / "frontier.json").read_text())})
    return files


#: absolute tolerance of a first-token KL (nats), about 2.5 float32 epsilons: between the planted pair's near-identical
#: models the KL (1e-7 to 4e-6) sits near float32's rounding, which moves with the CPU's vector kernels (the pin was
#: written on an Intel AMX machine; an AMD EPYC reads 4.64e-07 for its 4.78e-07, at most 7e-08 apart). The KL itself
#: is checked against torch's kl_div in test_divergence.py.
KL_ABS_TOL = 3e-7


def _differences(pinned: Any, now: Any, where: str = "") -> list[str]:
    """Where ``now`` differs from ``pinned`` (floats within 1e-6 relative; KLs also within :data:`KL_ABS_TOL`)."""
    if isinstance(pinned, dict) and isinstance(now, dict):
        keys = sorted(set(pinned) | set(now))
        return [d for k in keys for d in (_differences(pinned.get(k, "<absent>"), now.get(k, "<absent>"), f"{where}.{k}"))]
    if isinstance(pinned, list) and isinstance(now, list) and len(pinned) == len(now):
        return [d for i, (a, b) in enumerate(zip(pinned, now)) for d in _differences(a, b, f"{where}[{i}]")]
    if isinstance(pinned, float) and isinstance(now, (int, float)):
        abs_tol = KL_ABS_TOL if "kl_first_token" in where else 1e-9
        same = (math.isnan(pinned) and math.isnan(now)) or math.isclose(pinned, now, rel_tol=1e-6, abs_tol=abs_tol)
        return [] if same else [f"{where}: {pinned!r} → {now!r}"]
    return [] if pinned == now else [f"{where}: {pinned!r} → {now!r}"]


def test_a_whole_run_reproduces_its_pinned_metrics_and_frontier(tmp_path):
    now = run(tmp_path)
    for name in ("metrics", "frontier", "screened_metrics", "screened_frontier"):
        pinned = json.loads((PINNED / f"{name}.json").read_text())
        differences = _differences(pinned, now[name], name)
        assert not differences, "\n".join(differences[:20])
    assert now["frontier"] and any(p["measured"] == "estimate" for p in now["screened_frontier"])


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        files = run(Path(tmp))
    PINNED.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (PINNED / f"{name}.json").write_text(json.dumps(content, indent=1, default=float) + "\n")
    print(f"wrote {PINNED}")
