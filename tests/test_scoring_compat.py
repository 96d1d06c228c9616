"""Every scoring method's scores on a planted pair, pinned: a refactor of the scorers must reproduce them.

The pinned file was written by the scorers as they were before they became a registry
(``python tests/test_scoring_compat.py --write`` rewrites it; do that only for an intended change
of a method's numbers, and say so in the commit).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from cnt_lens import Utility, score
from cnt_lens.workflow.testing import planted_pair

PINNED = Path(__file__).parent / "data" / "planted_scores.safetensors"
ARCHS = ("llama", "gpt2")


def _cases(planted):
    cand = planted.mask.clone()
    cand[0, :6] = True  # the planted neurons and some others
    from cnt_lens import NeuronSelection

    cand = NeuronSelection(cand)
    return {
        "weight_attribution": ("weight_attribution", {}),
        "weight_attribution_last2": ("weight_attribution", {"positions": 2}),
        "weight_attribution_contrast": ("weight_attribution", {"contrast": 0.5}),
        "weight_attribution_preserve": ("weight_attribution", {"preserve": [Utility()], "preserve_weight": 3.0}),
        "attribution": ("attribution", {}),
        "attribution_contrast": ("attribution", {"contrast": 1.0}),
        "weight_patching": ("weight_patching", {"candidates": cand, "groups_per_pass": 4}),
        "activation_patching": ("activation_patching", {"candidates": cand}),
        "activation_contrast": ("activation_contrast", {}),
        "wanda": ("wanda", {}),
        "wanda_utility": ("wanda", {"utility": Utility(), "utility_quantile": 0.1}),
        "snip": ("snip", {}),
        "snip_utility": ("snip", {"utility": Utility()}),
        "weight_diff": ("weight_diff", {}),
        "nlsr_drift": ("nlsr_drift", {}),
        "random": ("random", {"seed": 3}),
    }


def compute(arch: str) -> dict[str, torch.Tensor]:
    pair, behaviour, planted = planted_pair(arch, n_planted=6, seed=0)
    return {f"{arch}/{name}": score(pair, behaviour, method, progress=False, **kw).values
            for name, (method, kw) in _cases(planted).items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_reproduces_its_pinned_scores(arch):
    from safetensors.torch import load_file

    pinned = load_file(str(PINNED))
    now = compute(arch)
    assert set(now) == {k for k in pinned if k.startswith(f"{arch}/")}
    for key, values in now.items():
        ref = pinned[key]
        scale = float(ref.nan_to_num().abs().max()) or 1.0
        close = dict(atol=1e-5 * scale, rtol=1e-4)
        gone, came = values.isnan() & ~ref.isnan(), ref.isnan() & ~values.isnan()
        # a set difference (NaN: excluded as a top utility neuron) may swap neurons whose utility importance ties
        # within float rounding (identical neurons of a tiny model); then their scores tie too, and nothing else moves
        assert gone.sum() == came.sum() <= 2, key
        torch.testing.assert_close(values[came].sort().values, ref[gone].sort().values, **close, msg=key)
        both = ~(values.isnan() | ref.isnan())
        torch.testing.assert_close(values[both], ref[both], **close, msg=key)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit(__doc__)
    from safetensors.torch import save_file

    PINNED.parent.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for a in ARCHS for k, v in compute(a).items()}, str(PINNED))
    print(f"wrote {PINNED}")
