"""The package's shape, as docs/architecture.md states it: layers never import upward, and a small top level.

The figures come from ``scripts/architecture_figures.py`` (the same functions), so the page, the script and
this test cannot drift apart.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

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
    # the folders are the layers: no module lies loose at the top of the package
    assert sorted(p.name for p in af.ROOT.glob("*.py")) == ["__init__.py"]


def test_modules_stay_small_signatures_narrow_and_private_names_private():
    fig = _figures_module().figures()
    assert fig["modules_over_450"] == [], "split the module by concern (docs/architecture.md, 'Layers')"
    assert fig["functions_over_8_params"] == [], "pass a settings record (cnt_lens.method.config) instead"
    assert fig["private_imports_across_modules"] == [], "a name another module needs is public"
    walk = fig["walk_of_pair"]
    assert walk["stops"] <= 25 and walk["climbs_back"] <= 8, f"the pair travels further than it did: {walk}"


def test_former_module_paths_import_with_a_warning_and_read_the_new_modules():
    import importlib
    import sys
    import warnings

    from cnt_lens.method import search
    from cnt_lens.method.scoring import attribution

    for name in ("cnt_lens.search", "cnt_lens.scoring", "cnt_lens.scoring.attribution"):
        sys.modules.pop(name, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("cnt_lens.search")
        from cnt_lens.scoring.attribution import attribution_family
    assert old.search_minimal is search.search_minimal and attribution_family is attribution.attribution_family
    messages = [str(w.message) for w in caught if w.category is DeprecationWarning]
    assert any("cnt_lens.search moved to cnt_lens.method.search" in m for m in messages)
    assert any("cnt_lens.scoring.attribution moved to cnt_lens.method.scoring.attribution" in m for m in messages)
    with warnings.catch_warnings(record=True) as caught:  # a name that moved to another module
        warnings.simplefilter("always")
        from cnt_lens.method.search import iterative_scores
    from cnt_lens.method import rounds

    assert iterative_scores is rounds.iterative_scores
    assert [str(w.message) for w in caught] == ["cnt_lens.method.search.iterative_scores moved to "
                                                "cnt_lens.method.rounds.iterative_scores; import it from there"]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        search.nothing  # noqa: B018


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
