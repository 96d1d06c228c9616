"""The package's shape, as docs/architecture.md states it: layers never import upward, and a small top level.

The figures come from ``scripts/architecture_figures.py`` (the same functions), so the page, the script and
this test cannot drift apart.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "architecture_figures.py"


def _figures_module():
    spec = importlib.util.spec_from_file_location("architecture_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["architecture_figures"] = module
    spec.loader.exec_module(module)
    return module


def test_no_module_imports_a_higher_layer_and_every_module_has_a_layer():
    af = _figures_module()
    mods = af.modules()
    assert af.figures()["imports_running_back_up"] == []
    unplaced = sorted({m.split(".")[0] for m in mods if m and af.layer(m) == len(af.LAYERS)} - {"prompts"})
    assert unplaced == [], f"modules without a layer in LAYERS (docs/architecture.md): {unplaced}"


def test_the_top_level_is_the_curated_workflow_and_former_names_say_where_they_went():
    import warnings

    import cnt_lens

    assert len(cnt_lens.__all__) <= 35
    assert all(hasattr(cnt_lens, name) for name in cnt_lens.__all__)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from cnt_lens.models import read_neurons

        assert cnt_lens.read_neurons is read_neurons
    assert any("cnt_lens.models.read_neurons" in str(w.message) for w in caught)


def test_the_walk_of_pair_is_counted_on_the_real_call_graph():
    walk = _figures_module().walk_of_pair(_figures_module().modules())
    # a transfer reaches scoring, the search and the patch: the walk must find at least those files
    assert walk["files"] >= 5 and walk["stops"] >= walk["files"]
