"""The command line on tiny models saved as local HF directories (which also tests directory loading)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cnt_lens import NeuronPatch, export_hf, load_model
from cnt_lens.cli import app
from cnt_lens.testing import planted_pair

runner = CliRunner()


def test_measure_and_transplant_on_local_directories(tmp_path):
    pair, behaviour, planted = planted_pair("llama", n_planted=6, seed=0)
    target_dir = export_hf(pair.target, tmp_path / "target")
    patch_path = NeuronPatch.from_pair(pair, planted).save(tmp_path / "patch")

    res = runner.invoke(app, ["measure", str(target_dir), "--split", "test", "--json", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    numbers = json.loads((tmp_path / "m.json").read_text())
    assert {"refusal_harmful", "refusal_harmless", "stereotype_score", "utility_nll", "mc_accuracy"} <= set(numbers)

    res = runner.invoke(app, ["transplant", str(patch_path), str(target_dir), "--out", str(tmp_path / "patched")])
    assert res.exit_code == 0, res.output
    patched = load_model(str(tmp_path / "patched"))
    assert behaviour.evaluate(patched, "test", progress=False)["marker_rate"] == 1.0
    assert behaviour.evaluate(load_model(str(target_dir)), "test", progress=False)["marker_rate"] < 0.2


def test_transplant_refuses_a_model_of_other_shape(tmp_path):
    from cnt_lens.testing import tiny_model

    pair, _, planted = planted_pair("llama", n_planted=4, seed=0)
    patch_path = NeuronPatch.from_pair(pair, planted).save(tmp_path / "patch")
    other = export_hf(tiny_model("llama", d_mlp=64), tmp_path / "other")
    res = runner.invoke(app, ["transplant", str(patch_path), str(other), "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "d_mlp" in str(res.exception)
    assert not (tmp_path / "x").exists()
