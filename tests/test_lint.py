"""The project's lint rules (pyproject.toml [tool.ruff]) hold, and they are the rules they claim to be."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, check=False)


def test_ruff_passes_on_the_project():
    r = _ruff(".")
    assert r.returncode == 0, f"ruff check found problems (fix them or run ruff check --fix):\n{r.stdout}{r.stderr}"


def test_ruff_config_enforces_docstrings_and_complexity():
    branches = "\n".join(f"    if x == {i}:\n        return {i}" for i in range(12))
    probe = f'"""Probe."""\n\n\ndef undocumented(x):\n{branches}\n    return -1\n'
    # Read from stdin as if it were a module of the package, so the package's rules apply (tests are exempt
    # from the docstring rules).
    r = _ruff("--output-format", "concise", "--stdin-filename", "cnt_lens/lint_probe.py", "-", stdin=probe)
    assert r.returncode == 1
    assert "D103" in r.stdout and "C901" in r.stdout, r.stdout
    r = _ruff("--output-format", "concise", "--stdin-filename", "tests/test_probe.py", "-", stdin=probe)
    assert "D103" not in r.stdout and "C901" in r.stdout, r.stdout
