"""The per-stage profile: nesting, accumulation, no-op outside a profile, and what a run directory gets."""

from __future__ import annotations

import json
import time

import pytest

from cnt_lens import profile, stage
from cnt_lens.core.timing import active_profile, timings_table


def test_stages_nest_accumulate_and_survive_errors(tmp_path):
    with profile() as prof:
        for _ in range(3):
            with stage("search"):
                with stage("generate"):
                    time.sleep(0.01)
        with pytest.raises(RuntimeError), stage("test"):
            raise RuntimeError("a stage that fails is still timed and closed")
        with stage("after"):
            pass
        with profile() as inner:  # a nested run adds to the outer profile
            with stage("inner run"):
                pass
    assert inner is prof and active_profile() is None
    rows = {r["stage"]: r for r in prof.rows()}
    assert list(rows) == ["search", "search / generate", "test", "after", "inner run"]
    assert rows["search"]["calls"] == 3 and rows["search / generate"]["depth"] == 1
    assert rows["search"]["seconds"] >= rows["search / generate"]["seconds"] >= 0.03
    # top-level stages never add up to more than the wall clock (unrounded: rows round to the millisecond)
    assert sum(prof.seconds[s] for s, r in rows.items() if r["depth"] == 0) <= prof.total()
    prof.save(tmp_path / "timings.json")
    saved = json.loads((tmp_path / "timings.json").read_text())
    assert [r["stage"] for r in saved["stages"]] == list(rows)
    text = timings_table(tmp_path / "timings.json")
    assert "\n  generate " in text and text.splitlines()[-1].startswith("total (wall)")


def test_stage_outside_a_profile_records_nothing():
    with stage("nothing listens"):
        pass
    assert active_profile() is None
