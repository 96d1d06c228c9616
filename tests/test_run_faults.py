"""Runs and generation settings: bad settings fail before any model loads, one writer per run directory, an
interrupted replacement is repaired, killed writes leave nothing behind, and generation refuses what it cannot do."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cnt_lens import generate
from cnt_lens.cli import app
from cnt_lens.core.files import (
    DirectoryLockedError,
    atomic_dir,
    atomic_write_text,
    clean_stale_temporaries,
    directory_lock,
)
from cnt_lens.data import chat_format
from cnt_lens.method.config import TransferConfig, override
from cnt_lens.method.resume import resumable
from cnt_lens.workflow.testing import tiny_model, tiny_tokenizer


@pytest.mark.parametrize("setting, value", [("baselines.methods", ("attribution", "wandaa")),
                                            ("ranking.method", "nope"), ("search.alphas", ()),
                                            ("search.alphas", (2.0, float("nan"))), ("search.alphas", (-1.0,)),
                                            ("search.goal", 0.0), ("search.goal", 1.5), ("search.max_fraction", 0.0),
                                            ("search.batch_size", 0), ("evaluation.batch_size", 0),
                                            ("ranking.batch_size", 0), ("baselines.random_seeds", 0)])
def test_every_transfer_setting_is_checked_on_construction(setting, value):
    section, field = setting.split(".")
    kind = {"ranking": "RankingConfig", "search": "SearchConfig", "baselines": "BaselineConfig",
            "evaluation": "EvaluationConfig"}[section]
    with pytest.raises(ValueError, match=f"{kind}: .*{field if field != 'methods' else 'wandaa'}"):
        override(TransferConfig(), {setting: value})


def test_a_config_reads_back_from_its_json_and_from_an_older_flat_layout():
    config = override(TransferConfig(about={"application": "enhance"}), {"search.alphas": (2.0, 4.0), "ranking.rounds": 3})
    assert TransferConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert TransferConfig.from_dict({**config.to_dict(), "future_section": {"x": 1}}) == config  # unknown keys ignored
    flat = TransferConfig.from_dict({"goal": 0.8, "alphas": [2.0], "baselines": ["random"], "screen_slack": 0.2,
                                     "batch_size": 32, "extra": {"application": "enhance"}})
    assert (flat.search.goal, flat.search.alphas, flat.baselines.methods, flat.search.slack) == (0.8, (2.0,), ("random",), 0.2)
    assert (flat.search.batch_size, flat.evaluation.batch_size, flat.about["application"]) == (32, 32, "enhance")
    with pytest.raises(ValueError, match="no setting 'search.gaol'"):
        override(config, {"search.gaol": 0.5})


@pytest.mark.parametrize("option, value", [("--alphas", "0"), ("--budget", "0"), ("--goal", "2"),
                                           ("--baselines", "attribution,wandaa")])
def test_the_cli_refuses_bad_settings_before_loading_a_model_and_leaves_no_run_behind(tmp_path, option, value):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["transfer", "--donor", str(tmp_path / "no-donor"), "--target",
                                   str(tmp_path / "no-target"), "--out", str(out), option, value])
    assert res.exit_code != 0
    text = res.output + str(res.exception or "")
    assert "no-donor" not in text and ("Config: " in text or "wandaa" in text), text  # not the model's error
    assert not (out / "resume").exists()


def test_run_application_checks_its_overrides_before_loading_the_model(tmp_path):
    from cnt_lens.experiments.applications import run_application

    with pytest.raises(ValueError, match="max_fraction"):
        run_application("enhance", tmp_path / "r", override(TransferConfig(), {"search.max_fraction": 0.0}),
                        model=str(tmp_path / "no-model"))


def test_one_writer_per_run_directory(tmp_path):
    with directory_lock(tmp_path / "run"):
        with pytest.raises(DirectoryLockedError, match=rf"run is being written by another cnt-lens process \(pid {os.getpid()}\)"):
            with directory_lock(tmp_path / "run"):
                pass
    with directory_lock(tmp_path / "run"):  # released on exit
        pass


def test_a_second_process_cannot_open_a_run_another_is_writing(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import sys; from cnt_lens.method.resume import resumable\n"
                              f"with resumable({str(tmp_path)!r}):\n    print('in', flush=True); sys.stdin.readline()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "in"
        with pytest.raises(DirectoryLockedError, match=f"pid {child.pid}"):
            with resumable(tmp_path):
                pass
    finally:
        child.communicate("\n", timeout=60)
    with resumable(tmp_path):  # the writer ended: the directory is free (a killed one frees it too)
        pass


def test_a_crash_between_the_two_renames_is_repaired_by_the_next_call(tmp_path, monkeypatch):
    target = tmp_path / "patched_model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("first")
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the old directory moved aside, before the new one landed
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target, overwrite=True) as tmp:
            (tmp / "weights").write_text("second")
    monkeypatch.setattr(os, "replace", real_replace)
    assert not target.exists() and (tmp_path / ".patched_model.old").is_dir()  # the state a crash leaves
    with pytest.raises(FileExistsError):  # the next call puts the old one back first, and so it exists
        with atomic_dir(target):
            pass
    assert (target / "weights").read_text() == "first" and not (tmp_path / ".patched_model.old").exists()


def test_a_checkpoint_whose_replacement_was_interrupted_is_put_back_when_loaded(tmp_path):
    from cnt_lens import export_hf, load_model

    model = tiny_model("llama")
    export_hf(model, tmp_path / "ckpt")
    os.replace(tmp_path / "ckpt", tmp_path / ".ckpt.old")  # what a crash between the renames leaves
    assert load_model(tmp_path / "ckpt").cfg.n_layers == model.cfg.n_layers


def test_temporaries_of_killed_writes_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".metrics.json.{dead_pid}.abc123.tmp"
    stale.write_text("half")
    stale_dir = tmp_path / f".metrics.json.{dead_pid}.def456.tmp"
    stale_dir.mkdir()
    live = tmp_path / f".metrics.json.{os.getppid()}.ghi789.tmp"  # our parent runs: its write may be under way
    live.write_text("in progress")
    foreign = tmp_path / ".metrics.json.notapid.tmp"
    foreign.write_text("not ours")
    atomic_write_text(tmp_path / "metrics.json", "{}")
    assert not stale.exists() and not stale_dir.exists() and live.exists() and foreign.exists()
    assert (tmp_path / "metrics.json").read_text() == "{}" and clean_stale_temporaries(tmp_path / "metrics.json") == []


@pytest.mark.parametrize("n", [0, -5, True])
def test_generation_refuses_a_length_that_gives_no_answer(n):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=f"max_new_tokens must be an int >= 1.*got {n!r}"):
        generate(model, [chat_format(tiny_tokenizer(), "hello")], max_new_tokens=n, progress=False)


def test_a_role_marker_typed_in_a_prompt_stays_text():
    tok = tiny_tokenizer()
    real = tok.convert_tokens_to_ids("<assistant>")
    ids = tok(chat_format(tok, "Sure <assistant> Sure"), add_special_tokens=False)["input_ids"]
    assert ids.count(real) == 1 and ids[-1] == real  # only the template's own assistant turn is the marker
