"""Bad input and faults: each gets a clear error or correct behaviour, and nothing is ever lost or half-written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from cnt_lens import NeuronPatch, NeuronSelection, Refusal, applied_patches, export_hf, load_model, search_minimal
from cnt_lens.cli import app
from cnt_lens.data import encode
from cnt_lens.data.formats import from_jsonl
from cnt_lens.method.transplant import PatchFileError
from cnt_lens.models import hf_state_dict
from cnt_lens.workflow.testing import planted_pair, tiny_hf_model, tiny_model, tiny_pair, tiny_tokenizer

runner = CliRunner()


def _weights(model):
    return {k: v.detach().clone() for k, v in hf_state_dict(model).items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def planted():
    return planted_pair("llama", n_planted=6, seed=0)


def test_a_patch_wider_than_the_model_is_refused_before_any_write(planted, tmp_path):
    pair, _, sel = planted
    wide = tiny_pair("llama", d_mlp=64)
    wide_sel = NeuronSelection.from_indices([(0, 1), (1, 60)], 2, 64)
    path = NeuronPatch.from_pair(wide, wide_sel).save(tmp_path / "wide")
    before = _weights(pair.target)
    with pytest.raises(Exception, match="d_mlp|selection"):
        NeuronPatch.load(path, pair.target)
    patch = NeuronPatch.load(path)
    with pytest.raises(Exception, match="d_mlp|selection"):
        patch.apply(pair.target)
    assert _same(before, _weights(pair.target)) and applied_patches(pair.target) == []


def test_apply_is_all_or_nothing(monkeypatch):
    pair = tiny_pair("llama")  # independent models: every neuron differs
    sel = NeuronSelection.from_indices([(0, 3), (1, 5)], pair.n_layers, pair.d_mlp)
    patch = NeuronPatch.from_pair(pair, sel, alpha=1.0)
    before = _weights(pair.target)
    import cnt_lens.method.transplant as tr

    real = tr.neuron_params

    def failing(model, layer):  # layer 0 is written, then layer 1 fails
        if layer == 1:
            raise RuntimeError("disk on fire")
        return real(model, layer)

    monkeypatch.setattr(tr, "neuron_params", failing)
    monkeypatch.setattr(NeuronPatch, "check_fits", lambda self, model: None)
    with pytest.raises(RuntimeError, match="disk on fire"):
        patch.apply(pair.target)
    monkeypatch.undo()
    assert _same(before, _weights(pair.target)) and applied_patches(pair.target) == []
    patch.apply(pair.target)  # and it still applies once the fault is gone
    assert not _same(before, _weights(pair.target))


def test_transplant_never_overwrites_its_source_or_an_existing_checkpoint(planted, tmp_path):
    pair, _, sel = planted
    src = export_hf(pair.target, tmp_path / "target")
    patch = NeuronPatch.from_pair(pair, sel).save(tmp_path / "p")
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    res = runner.invoke(app, ["transplant", str(patch), str(src), "--out", str(src)])
    assert res.exit_code != 0 and "source model" in res.output
    res = runner.invoke(app, ["transplant", str(patch), str(src), "--out", str(src), "--overwrite"])
    assert res.exit_code != 0 and "source model" in res.output
    assert {p.name: p.read_bytes() for p in src.iterdir()} == files
    out = tmp_path / "patched"
    assert runner.invoke(app, ["transplant", str(patch), str(src), "--out", str(out)]).exit_code == 0
    res = runner.invoke(app, ["transplant", str(patch), str(src), "--out", str(out)])
    assert res.exit_code != 0 and "--overwrite" in res.output
    assert runner.invoke(app, ["transplant", str(patch), str(src), "--out", str(out), "--overwrite"]).exit_code == 0
    with pytest.raises(FileExistsError):
        export_hf(pair.target, out)


def test_save_keeps_names_with_dots(planted, tmp_path):
    pair, _, sel = planted
    a = NeuronPatch.from_pair(pair, sel, alpha=4.0).save(tmp_path / "patch_a4.0")
    b = NeuronPatch.from_pair(pair, sel, alpha=4.5).save(tmp_path / "patch_a4.5")
    assert a.name == "patch_a4.0.safetensors" and b.name == "patch_a4.5.safetensors"
    assert NeuronPatch.load(a).alpha == 4.0 and NeuronPatch.load(tmp_path / "patch_a4.5.json").alpha == 4.5


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_alpha_is_refused_everywhere(planted, tmp_path, bad):
    pair, _, sel = planted
    with pytest.raises(ValueError, match="finite"):
        NeuronPatch.from_pair(pair, sel, alpha=bad)
    patch = NeuronPatch.from_pair(pair, sel)
    with pytest.raises(ValueError, match="finite"):
        patch.with_alpha(bad)
    # a file whose header says alpha = bad
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = patch.save(tmp_path / "p")
    with safe_open(str(path), framework="pt") as f:
        tensors, header = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["cnt_lens"])
    save_file(tensors, str(path), metadata={"cnt_lens": json.dumps({**header, "alpha": bad})})
    (tmp_path / "p.json").unlink()
    with pytest.raises(PatchFileError, match="finite"):
        NeuronPatch.load(path)
    src = export_hf(pair.target, tmp_path / "t")
    good = patch.save(tmp_path / "good")
    res = runner.invoke(app, ["transplant", str(good), str(src), "--out", str(tmp_path / "o"), "--alpha", str(bad)])
    assert res.exit_code != 0 and "finite" in res.output and not (tmp_path / "o").exists()


def test_non_finite_donor_weights_are_refused(planted):
    pair, _, sel = planted
    layer = sel.indices()[0][0]
    with torch.no_grad():
        pair.donor.blocks[layer].mlp.out.original_component.weight[0, sel.layer_indices(layer)[0]] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        NeuronPatch.from_pair(pair, sel)


def test_a_transplant_that_overflows_is_rolled_back_whole(planted):
    pair, _, sel = planted
    layer = sel.indices()[-1][0]  # the last layer written: every earlier write must be undone
    with torch.no_grad():
        pair.donor.blocks[layer].mlp.out.original_component.weight[0, sel.layer_indices(layer)[0]] = 10.0
    before = _weights(pair.target)
    patch = NeuronPatch.from_pair(pair, sel, alpha=1e38)  # finite alpha and weights; 1e38 * 10 overflows float32
    with pytest.raises(ValueError, match=rf"layer {layer} W_out: the transplant at alpha 1e\+38 gives non-finite"):
        patch.apply(pair.target)
    assert _same(before, _weights(pair.target)) and not applied_patches(pair.target)


def test_the_same_patch_content_applies_once(planted, tmp_path):
    pair, _, sel = planted
    before = _weights(pair.target)
    path = NeuronPatch.from_pair(pair, sel, alpha=2.0).save(tmp_path / "p")
    first, second = NeuronPatch.load(path), NeuronPatch.load(path)
    assert first is not second and first.content_hash == second.content_hash
    first.apply(pair.target)
    with pytest.raises(ValueError, match="already applied"):
        second.apply(pair.target)
    second.revert(pair.target)  # a copy reverts it too: the journal is keyed by content
    assert _same(before, _weights(pair.target))
    assert first.with_alpha(1.0).content_hash != first.content_hash


def test_patch_files_are_cross_checked(planted, tmp_path):
    pair, _, sel = planted
    a = NeuronPatch.from_pair(pair, sel, alpha=1.0)
    b = NeuronPatch.from_pair(pair, sel, alpha=2.0)
    path = a.save(tmp_path / "p")
    b.save(tmp_path / "other")
    (tmp_path / "other.json").replace(tmp_path / "p.json")  # a sidecar from another save
    with pytest.raises(PatchFileError, match="does not describe"):
        NeuronPatch.load(path)
    (tmp_path / "p.json").unlink()
    assert NeuronPatch.load(path).content_hash == a.content_hash  # the .safetensors alone is the patch
    header = json.loads(a.save(tmp_path / "q").with_suffix(".json").read_text())
    assert header["format"] == "cnt_lens.NeuronPatch/2" and header["content_hash"] == a.content_hash
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary files left behind


def test_damaged_patch_files_name_the_file(planted, tmp_path):
    pair, _, sel = planted
    path = NeuronPatch.from_pair(pair, sel).save(tmp_path / "p")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PatchFileError, match=str(path.name)):
        NeuronPatch.load(path)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(PatchFileError, match=str(path.name)):
        NeuronPatch.load(path)


@pytest.mark.parametrize("line, message", [
    ('{"text": "hello"}', "missing field.*prompt.*text_field"),
    ('{"prompt": 42}', "'prompt' must be a non-empty string"),
    ('["a list"]', "JSON object"),
    ('{"prompt": "ok", "split": "dev"}', "split 'dev'"),
    ("{not json", "not JSON"),
])
def test_malformed_jsonl_rows_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "a fine first row"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        from_jsonl(path)
    assert f"{path}:2:" in str(err.value)


def test_long_prompts_are_cut_to_the_models_context_keeping_bos():
    model = tiny_model("llama")  # 256 positions
    tok = tiny_tokenizer()
    text = " ".join(["bomb"] * 400)
    with pytest.warns(UserWarning, match="keeping BOS"):
        b = encode(tok, [text], add_bos=True)
    assert b.tokens.shape[1] == 256 and b.tokens[0, 0] == tok.bos_token_id
    with torch.no_grad():
        assert torch.isfinite(model(b.tokens, **b.model_kwargs())).all()


def test_report_names_unknown_applications(tmp_path):
    res = runner.invoke(app, ["report", str(tmp_path), "--application", "nope"])
    assert res.exit_code != 0 and "unknown application 'nope'" in res.output


def test_run_names_unknown_baselines_before_loading_anything(tmp_path):
    res = runner.invoke(app, ["run", "enhance", "--out", str(tmp_path / "r"), "--baselines", "attribution,nope"])
    assert res.exit_code != 0 and "unknown baseline(s) ['nope']" in res.output
    assert not (tmp_path / "r").exists()


def test_search_refuses_nonsense_settings(planted):
    pair, behaviour, _ = planted
    from cnt_lens import score
    from cnt_lens.method.config import SearchConfig

    scores = score(pair, behaviour, "weight_diff")
    for kwargs, message in [({"alphas": (math.nan,)}, "finite"), ({"alphas": (0.0,)}, "> 0"),
                            ({"max_fraction": 0}, "max_fraction"), ({"max_fraction": 1e-6}, "allows 0")]:
        with pytest.raises(ValueError, match=message):
            search_minimal(pair, behaviour, scores, SearchConfig(**kwargs), progress=False)


def test_evaluation_needs_an_explicit_split(planted):
    pair, behaviour, _ = planted
    with pytest.raises(TypeError):
        behaviour.evaluate(pair.target)
    with pytest.raises(TypeError):
        Refusal().evaluate_items(pair.target)


def test_hub_ids_load_from_the_hf_cache_offline(tmp_path):
    """A source that is not a local path is a hub id: resolved through an HF cache built here, offline."""
    hf = tiny_hf_model("llama", seed=5)
    snapshot = tmp_path / "hub" / "models--cnt-lens--tiny-llama" / "snapshots" / ("a" * 40)
    hf.save_pretrained(snapshot)
    tiny_tokenizer().save_pretrained(snapshot)
    (tmp_path / "hub" / "models--cnt-lens--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--cnt-lens--tiny-llama" / "refs" / "main").write_text("a" * 40)
    code = ("import torch, cnt_lens as cl; m = cl.load_model('cnt-lens/tiny-llama'); "
            "print('LOADED', m.cfg.n_layers, m.cfg.d_mlp, float(sum(p.sum() for p in m.parameters())))")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = out.stdout.split("LOADED")[1].split()
    assert loaded[:2] == ["2", "48"]
    assert float(loaded[2]) == pytest.approx(float(sum(p.detach().sum() for p in hf.parameters())), rel=1e-5)
    # a path-shaped source that does not exist is a missing path, not a hub id
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(str(tmp_path / "nowhere"))
