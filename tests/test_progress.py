"""Progress off a terminal: stage start/end lines, a heartbeat during long quiet work, nothing left open."""

from __future__ import annotations

import logging
import time

import pytest

from cnt_lens import stage
from cnt_lens.core import progress
from cnt_lens.core.progress import progress_bar


@pytest.fixture
def fast_heartbeat(monkeypatch):
    """A heartbeat every 0.2 s instead of every 30 s (the thread polls at a quarter of it)."""
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.2)


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("cnt_lens")]


def test_a_slow_loop_off_a_terminal_logs_done_of_total(fast_heartbeat, caplog):
    caplog.set_level(logging.INFO, logger="cnt_lens")
    with stage("fine-tune"):
        for _ in progress_bar(range(3), desc="steps"):
            time.sleep(0.8)  # one step quieter than the heartbeat: a line must come from inside it
    lines = _messages(caplog)
    beats = [m for m in lines if m.startswith("… fine-tune / steps (")]
    assert beats, lines
    assert any("steps (0/3)" in m or "steps (1/3)" in m for m in beats) and all(m.endswith(" elapsed") for m in beats)
    assert lines[0] == "fine-tune …" and lines[-1].startswith("fine-tune: done in ")
    assert progress._open == []  # the loop and the stage closed their tasks


def test_nested_short_stages_stay_quiet_and_outer_ones_speak(caplog):
    caplog.set_level(logging.INFO, logger="cnt_lens")
    with stage("search"):
        for _ in range(5):
            with stage("generate"):
                pass
    assert _messages(caplog) == ["search …", "search: done in 0 s"]


def test_a_manual_bar_and_a_broken_loop_close_their_tasks(caplog):
    bar = progress_bar(desc="points", total=4)
    bar.update(2)
    assert progress._open[-1].done == 2 and progress._open[-1].status() == "points (2/4)"
    bar.close()
    for i in progress_bar(range(10), desc="early exit"):
        if i == 2:
            break
    assert progress._open == []


def test_a_disabled_bar_is_not_tracked():
    with stage("outer"):
        progress_bar(range(3), desc="quiet", enabled=False)
        assert [t.desc for t in progress._open] == ["outer"]


def test_a_stage_that_raises_says_it_failed(caplog):
    caplog.set_level(logging.INFO, logger="cnt_lens")
    with pytest.raises(RuntimeError), stage("load models"):
        raise RuntimeError("no such model")
    assert _messages(caplog)[-1].startswith("load models: failed after ")
