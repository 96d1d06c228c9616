"""Pairs and model files: a pair that cannot transplant, or a checkpoint that cannot be read, is a clear error."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from cnt_lens import ModelPair, load_model
from cnt_lens.cli import app
from cnt_lens.core.errors import CntLensError
from cnt_lens.models import IncompatibleModelsError, ModelFileError
from cnt_lens.models.offline import OFFLINE_MODELS, offline_path
from cnt_lens.workflow.testing import tiny_hf_model, tiny_model, tiny_tokenizer


def _permuted_tokenizer():
    """The tiny tokenizer with its ordinary words' ids reversed: the same words, other ids."""
    base = tiny_tokenizer()
    vocab = base.get_vocab()
    special = set(base.all_special_tokens)
    words = sorted((w for w in vocab if w not in special), key=vocab.get)
    ids = sorted(vocab[w] for w in words)
    permuted = {**{w: vocab[w] for w in special}, **dict(zip(words, reversed(ids)))}
    tk = Tokenizer(models.WordLevel(permuted, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=["<user>", "<assistant>"],
                                  name_or_path="cnt-lens-tiny-permuted")
    tok.chat_template, tok.add_bos_token = base.chat_template, True
    return tok


def test_a_donor_that_tokenizes_differently_is_refused():
    target = tiny_model("llama", seed=0)
    donor = load_model(tiny_hf_model("llama", seed=1), tokenizer=_permuted_tokenizer())
    with pytest.raises(IncompatibleModelsError, match="tokenize the same text differently"):
        ModelPair(donor=donor, target=target)
    ModelPair(donor=tiny_model("llama", seed=1), target=target)  # the same tokenizer, loaded twice, is accepted


@pytest.mark.parametrize("side", ["donor", "target"])
def test_a_model_with_nan_weights_is_refused_naming_the_tensor(side):
    models_ = {"donor": tiny_model("llama", seed=1), "target": tiny_model("llama", seed=0)}
    name, param = next((n, p) for n, p in models_[side].named_parameters() if "mlp" in n)
    with torch.no_grad():
        param.view(-1)[3] = float("nan")
    with pytest.raises(ValueError, match=rf"the {side} .* holds NaN or inf in {name}"):
        ModelPair(**models_)


def test_a_file_inside_a_checkpoint_is_not_taken_for_its_directory(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match=r"config\.json is a file, not a model: give the checkpoint's directory"):
        load_model(tmp_path / "ckpt" / "config.json")


def test_a_half_written_safetensors_checkpoint_names_the_file(tmp_path):
    ckpt = tmp_path / "ckpt"
    tiny_hf_model("llama").save_pretrained(ckpt)
    tiny_tokenizer().save_pretrained(ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelFileError, match=r"ckpt.*cannot read the checkpoint .*truncated or damaged"):
        load_model(ckpt)


def test_empty_and_truncated_gguf_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"empty\.gguf: empty"):
        load_model(empty)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelFileError, match=r"other\.gguf: not a GGUF file"):
        load_model(other)
    cut = tmp_path / "cut.gguf"
    with open(offline_path("smollm2-135m-instruct"), "rb") as f:
        cut.write_bytes(f.read(2_000_000))
    with pytest.raises(ModelFileError, match=r"cut\.gguf: cannot read the checkpoint"):
        load_model(cut)


def test_a_truncated_file_at_an_offline_alias_path_is_refused_before_parsing(tmp_path, monkeypatch):
    cut = tmp_path / "model.gguf"
    cut.write_bytes(b"GGUF" + bytes(100))
    alias = OFFLINE_MODELS["smollm2-135m-instruct"]
    monkeypatch.setitem(OFFLINE_MODELS, alias.alias, type(alias)(alias.alias, lambda: cut, alias.setup, alias.size))
    with pytest.raises(ValueError, match=r"has 104 bytes, the offline model .* truncated or damaged.*bash scripts/setup"):
        load_model("smollm2-135m-instruct")


def test_a_mistyped_alias_fails_at_once_with_the_close_match():
    with pytest.raises(FileNotFoundError, match="did you mean 'smollm2-135m-instruct'"):
        load_model("smollm2-135m-instruc")


def test_the_cli_prints_an_expected_error_as_one_message_without_a_traceback(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    res = CliRunner().invoke(app, ["measure", str(empty)])
    assert isinstance(res.exception, CntLensError)  # the runner sees it; the program's entry prints it, below
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "from cnt_lens.cli import app; app()", "measure", str(empty)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"cnt-lens: error: {empty}: empty")
    debug = subprocess.run([sys.executable, "-c", "from cnt_lens.cli import app; app()", "--debug", "measure",
                            str(empty)], capture_output=True, text=True, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
