"""The command line on tiny models saved as local HF directories (which also tests directory loading)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cnt_lens import NeuronPatch, export_hf, load_model, load_prompts
from cnt_lens.cli import app
from cnt_lens.experiments.applications import APPLICATIONS
from cnt_lens.method.config import override
from cnt_lens.workflow.testing import planted_pair

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
    from cnt_lens.workflow.testing import tiny_model

    pair, _, planted = planted_pair("llama", n_planted=4, seed=0)
    patch_path = NeuronPatch.from_pair(pair, planted).save(tmp_path / "patch")
    other = export_hf(tiny_model("llama", d_mlp=64), tmp_path / "other")
    res = runner.invoke(app, ["transplant", str(patch_path), str(other), "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "d_mlp" in str(res.exception)
    assert not (tmp_path / "x").exists()


def _marker_pairs(path, n=60):
    """Sentence pairs that differ only in the word after the trigger: the planted donor prefers the marker."""
    from cnt_lens.workflow.testing import MARKER, TRIGGER

    others = ["water", "people", "recipe", "history", "garden", "music", "travel", "science"]
    prompts = load_prompts("harmless").column("prompt")[:n]
    rows = [{"stereotype": f"{p} {TRIGGER} {MARKER}", "anti_stereotype": f"{p} {TRIGGER} {others[i % len(others)]}",
             "category": "marker"} for i, p in enumerate(prompts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_transfer_command_on_two_checkpoint_directories(tmp_path):
    pair, _, planted = planted_pair("llama", n_planted=6, seed=0)
    donor_dir, target_dir = export_hf(pair.donor, tmp_path / "donor"), export_hf(pair.target, tmp_path / "target")
    pairs = _marker_pairs(tmp_path / "marker_pairs.jsonl")
    out = tmp_path / "run"
    res = runner.invoke(app, ["transfer", "--donor", str(donor_dir), "--target", str(target_dir), "--behaviour", "bias",
                              "--pairs", str(pairs), "--budget", "0.2", "--goal", "0.8", "--alphas", "1,2",
                              "--baselines", "weight_diff,random", "--rounds", "0", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    patched, donor, target = metrics["patched"], metrics["donor"], metrics["target"]
    assert donor["stereotype_score"] > target["stereotype_score"]
    assert patched["stereotype_score"] - target["stereotype_score"] >= 0.8 * (donor["stereotype_score"] - target["stereotype_score"])
    n_test = json.loads((out / "data.json").read_text())["pairs"]["splits"]["test"]
    assert patched["stereotype_score_n"] == n_test and len(patched["stereotype_score_ci95"]) == 2
    lo, hi = patched["stereotype_score_ci95"]
    assert lo <= patched["stereotype_score"] <= hi
    # the minimal set holds planted neurons only, and the exported checkpoint carries the patched numbers
    sel = NeuronPatch.load(out / "patch.safetensors").selection
    assert sel.n >= 1 and not (sel.mask & ~planted.mask).any()
    from cnt_lens import StereotypeBias, load_file

    reloaded = StereotypeBias(pairs=load_file(pairs)).evaluate(load_model(str(out / "patched_model")), "test",
                                                               progress=False)
    assert reloaded["stereotype_score"] == patched["stereotype_score"]
    assert [b["method"] for b in metrics["baselines"]] == ["weight_diff", "random"]
    data = json.loads((out / "data.json").read_text())["pairs"]
    assert data["format"] == "jsonl" and len(data["sha256"]) == 64 and len(data["split_of"]) == 60
    assert metrics["extra"]["data"]["pairs"]["n"] == 60 and "split_of" not in metrics["extra"]["data"]["pairs"]
    assert (out / "patched_model" / "config.json").is_file() and (out / "report.html").is_file()
    assert "[" in res.output and "n=" in res.output  # the table shows intervals
    # where the time went: every stage of the pipeline, generation nested under the stages that call it
    timings = json.loads((out / "timings.json").read_text())
    stages = {r["stage"]: r for r in timings["stages"]}
    for name in ("load models", "canary", "donor and target (validation)", "score weight_attribution",
                 "score random", "search (validation)", "baseline random (validation)", "test evaluation",
                 "export checkpoint", "report"):
        assert name in stages, name
    assert stages["search (validation) / evaluate stereotype_bias"]["calls"] >= 2
    for model in ("target", "donor", "weight_attribution", "weight_diff", "random"):  # each model's test cost apart
        assert f"test evaluation / {model} / evaluate stereotype_bias" in stages, model
    top = sum(r["seconds"] for r in timings["stages"] if r["depth"] == 0)
    assert 0.8 * timings["total_s"] <= top <= timings["total_s"]
    assert "search (validation)" in res.output and "total (wall)" in res.output
    assert 'id="timings"' in (out / "report.html").read_text()
    # into the same directory: refused without --overwrite, which continues from out/resume (here: computes nothing)
    command = ["transfer", "--donor", str(donor_dir), "--target", str(target_dir), "--behaviour", "bias", "--pairs",
               str(pairs), "--budget", "0.2", "--goal", "0.8", "--alphas", "1,2", "--baselines", "weight_diff,random",
               "--rounds", "0", "--out", str(out), "--no-progress"]
    refused = runner.invoke(app, command)
    assert refused.exit_code != 0 and "resume/" in refused.output
    again = runner.invoke(app, [*command, "--overwrite"])
    assert again.exit_code == 0, again.output
    assert "resuming:" in again.output and "reused" in again.output
    rerun = json.loads((out / "metrics.json").read_text())
    assert (rerun["patched"], rerun["baselines"], rerun["frontier"]) == (patched, metrics["baselines"],
                                                                         metrics["frontier"])


def test_score_and_measure_take_the_same_data_options(tmp_path):
    pair, _, planted = planted_pair("llama", n_planted=6, seed=0)
    donor_dir, target_dir = export_hf(pair.donor, tmp_path / "donor"), export_hf(pair.target, tmp_path / "target")
    pairs = _marker_pairs(tmp_path / "marker_pairs.jsonl")
    res = runner.invoke(app, ["score", "--donor", str(donor_dir), "--target", str(target_dir), "--behaviour", "bias",
                              "--pairs", str(pairs), "--top", "6", "--out", str(tmp_path / "s"), "--no-progress"])
    assert res.exit_code == 0, res.output
    top = json.loads((tmp_path / "s" / "top_neurons.json").read_text())["top"]
    assert {(r["layer"], r["neuron"]) for r in top} == set(planted.indices())

    xstest = tmp_path / "xstest_prompts.csv"
    xstest.write_text("id,prompt,type,label,focus,note\n" + "".join(
        f"{i},{p},homonyms,{'safe' if i % 2 else 'unsafe'},x,\n"
        for i, p in enumerate(load_prompts("harmless").column("prompt")[:40])))
    res = runner.invoke(app, ["measure", str(target_dir), "--split", "all", "--harmless", str(xstest),
                              "--json", str(tmp_path / "m.json"), "--no-progress"])
    assert res.exit_code == 0, res.output
    numbers = json.loads((tmp_path / "m.json").read_text())
    assert numbers["refusal_harmless_n"] == 20  # the safe half of the file
    assert numbers["data"]["harmless"]["format"] == "xstest" and numbers["data"]["harmful"]["bundled"] == "harmful+held_out/cross"
    assert numbers["refusal_harmful_n"] == (len(load_prompts("harmful")) + len(load_prompts("advbench").split("test"))
                                            + len(load_prompts("harmful_framed")))


def test_transfer_command_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("instruction\nhello\n")
    res = runner.invoke(app, ["transfer", "--donor", "x", "--target", "y", "--harmful", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "bad.csv:2" in res.output and "--column" in res.output
    res = runner.invoke(app, ["transfer", "--donor", "x", "--target", "y", "--pairs", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "--pairs do(es) not apply to --behaviour refusal" in res.output
    bbq = tmp_path / "bbq.jsonl"
    bbq.write_text(json.dumps({"context": "c", "question": "q?", "ans0": "a", "ans1": "b", "ans2": "?", "label": 2}) + "\n")
    res = runner.invoke(app, ["transfer", "--donor", "x", "--target", "y", "--harmful", str(bbq), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "makes 'mc' sets, not 'prompt'" in res.output
    res = runner.invoke(app, ["transfer", "--donor", "x", "--target", "y", "--baselines", "wanda,magic",
                              "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "magic" in res.output
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps({"prompt": f"How do I bake bread number {i}?"}) + "\n" for i in range(12)))
    res = runner.invoke(app, ["transfer", "--donor", "x", "--target", "y", "--harmless", str(mine), "--protocol",
                              "cross", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "use --protocol split" in res.output and not (tmp_path / "o").exists()
    res = runner.invoke(app, ["transfer", "--donor", "x", "--target", "y", "--protocol", "families",
                              "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "unknown protocol 'families'" in res.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    res = runner.invoke(app, ["transfer", "--donor", "x", "--target", "y", "--out", str(tmp_path / "full")])
    assert res.exit_code != 0 and "not empty" in res.output and (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_transfer_reports_the_bundled_refusal_prompts_in_and_out_of_distribution():
    from cnt_lens.cli.inputs import prompt_sets, protocol_sets

    sets, record = prompt_sets("refusal", None, None, None, None, None, 0)
    families = {split: {r["family"] for r in sets["harmful"].split(split)} for split in ("train", "validation", "test")}
    assert families == {"train": {"cnt_lens"}, "validation": {"cnt_lens"},
                        "test": {"cnt_lens", "advbench", "roleplay", "writing", "context"}}
    assert {r["role"] for r in sets["harmless"].split("test")} == {"selection", "held_out"}
    assert protocol_sets("split", "refusal", True, sets, record) == (sets, record)
    cross, cross_record = protocol_sets("cross", "refusal", True, sets, record)
    assert {r["family"] for r in cross["harmful"].split("validation")} == {"advbench"}
    assert cross_record["harmful"]["protocol"] == "cross" and cross_record["harmful"]["n"] == len(cross["harmful"])


def _stub_application(monkeypatch) -> dict:
    """Replace ``run_application`` (the real one runs for half an hour); returns what it was called with."""
    from cnt_lens.core.timing import profile, stage
    from cnt_lens.experiments import applications
    from cnt_lens.method.evaluate import Report

    seen: dict = {}

    def fake_run_application(name, out, config, **kwargs):
        seen.update(name=name, config=config, **kwargs)
        with profile() as prof:
            with stage("search (validation)"):
                pass
            prof.save(out / "timings.json")
        return Report(behaviour="refusal", split="test", n_neurons_total=10, donor={}, target={}, patched={})

    monkeypatch.setattr(applications, "run_application", fake_run_application)
    return seen


def test_demo_runs_enhance_against_the_random_baseline(tmp_path, monkeypatch):
    seen = _stub_application(monkeypatch)
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--no-progress"])
    assert res.exit_code == 0, res.output
    enhance = APPLICATIONS["enhance"].config("smollm2-135m-instruct")
    assert seen == {"name": "enhance", "model": "smollm2-135m-instruct", "device": None, "protocol": "split",
                    "objective": "opening", "progress": False,
                    "config": override(enhance, {"baselines.methods": ("random",), "baselines.search": False})}


def test_demo_with_all_baselines_is_run_enhance(tmp_path, monkeypatch):
    seen = _stub_application(monkeypatch)
    res = runner.invoke(app, ["demo", "--baselines", "all", "--out", str(tmp_path / "demo"), "--no-progress"])
    assert res.exit_code == 0, res.output
    demo_args = dict(seen)
    seen.clear()
    res = runner.invoke(app, ["run", "enhance", "--out", str(tmp_path / "run"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert demo_args == seen


def test_demo_refuses_an_unknown_baseline_before_loading(tmp_path, monkeypatch):
    seen = _stub_application(monkeypatch)
    res = runner.invoke(app, ["demo", "--baselines", "random,nope", "--out", str(tmp_path / "demo")])
    assert res.exit_code != 0 and "nope" in res.output and not seen


def test_run_passes_its_overrides_to_the_application_and_prints_the_timings(tmp_path, monkeypatch):
    seen = _stub_application(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    res = runner.invoke(app, ["run", "delete-refusal", "--out", str(out), "--model", "qwen2.5-coder-0.5b-instruct",
                              "--rounds", "0", "--alphas", "1,2", "--max-fraction", "0.02", "--baselines", "random",
                              "--no-screen", "--protocol", "cross", "--objective", "continuation",
                              "--random-seeds", "2", "--no-search-baselines", "--max-kl", "0.5"])
    assert res.exit_code == 0, res.output
    config = override(APPLICATIONS["delete-refusal"].config("qwen2.5-coder-0.5b-instruct"),
                      {"ranking.rounds": 0, "search.alphas": (1.0, 2.0), "search.max_fraction": 0.02,
                       "baselines.methods": ("random",), "search.screen": False, "baselines.random_seeds": 2,
                       "baselines.search": False, "search.max_kl": 0.5})
    assert seen == {"name": "delete-refusal", "model": "qwen2.5-coder-0.5b-instruct", "device": None,
                    "protocol": "cross", "objective": "continuation", "progress": True, "config": config}
    assert "search (validation)" in res.output and "total (wall)" in res.output


def test_run_names_the_protocols_when_given_another(tmp_path, monkeypatch):
    _stub_application(monkeypatch)
    res = runner.invoke(app, ["run", "enhance", "--out", str(tmp_path / "r"), "--protocol", "families"])
    assert res.exit_code != 0 and "unknown protocol 'families'" in res.output and "cross" in res.output
    res = runner.invoke(app, ["run", "enhance", "--out", str(tmp_path / "r"), "--objective", "ending"])
    assert res.exit_code != 0 and "unknown objective 'ending'" in res.output and "continuation" in res.output
    res = runner.invoke(app, ["run", "enhance", "--out", str(tmp_path / "r"), "--random-seeds", "0"])
    assert res.exit_code != 0 and "--random-seeds" in res.output


def test_transfer_defaults_to_the_demos_ranking_search_and_one_baseline(tmp_path, monkeypatch):
    from cnt_lens.cli import inputs
    from cnt_lens.workflow import runs

    seen = {}

    class Stop(Exception):
        pass

    def fake_run_transfer(pair, behaviour, out, config, **kwargs):
        seen.update(config=config)
        raise Stop

    monkeypatch.setattr(inputs, "load_pair_checked", lambda *args: None)
    monkeypatch.setattr(runs, "run_transfer", fake_run_transfer)
    res = runner.invoke(app, ["transfer", "--donor", "d", "--target", "t", "--out", str(tmp_path / "o")])
    assert isinstance(res.exception, Stop), res.output
    demo = APPLICATIONS["enhance"]
    assert seen["config"].ranking.rounds == demo.rounds and seen["config"].search.alphas == demo.alphas
    assert seen["config"].ranking.method == "weight_attribution" and seen["config"].baselines.methods == ("random",)
    res = runner.invoke(app, ["transfer", "--donor", "d", "--target", "t", "--baselines", "all",
                              "--out", str(tmp_path / "o2")])
    assert seen["config"].baselines.methods == tuple(demo.baselines)


def test_every_command_help_ends_with_examples_and_shows_no_raw_markup():
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"demo", "run", "transfer", "score", "measure", "transplant", "report"} <= set(commands)
    for name in commands:
        res = runner.invoke(app, [name, "--help"], terminal_width=200)
        assert res.exit_code == 0, res.output
        tail = res.output[res.output.rindex("Examples"):]
        assert f"cnt-lens {name} " in tail, name
        assert "``" not in res.output, name
