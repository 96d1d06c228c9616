"""Work a run has finished, kept in its directory, so that the same command run again continues.

Inside ``with resumable(out):`` every evaluation (:func:`~cnt_lens.method.evaluate.measure`, one entry per
model state, behaviour and split) and every scoring pass (:func:`~cnt_lens.method.scoring.score`) is looked
up before it is computed and written down as soon as it is: a run killed after two hours and started
again with the same command redoes none of those two hours, and a finished run rerun with one more
baseline computes only that baseline. Outside such a block nothing is remembered.

A result is found again only when everything it depends on is the same:

- each model's weights, by :func:`weights_digest` taken the first time the model is seen unpatched
  (a model first seen with patches applied is not remembered), its device (greedy decoding can
  differ between devices in a few prompts), and the patches applied to it, by their content hashes
  in order (:mod:`cnt_lens.core.journal`);
- the behaviour, by its full ``repr`` (prompts with their splits, judge settings, continuation);
- the split, batch size, estimate or evaluation (scores: method, options, positions), and the
  versions of torch, transformers and transformer-lens.

Anything else is computed afresh; to recompute everything, delete ``{out}/resume/``. Files:
``resume/measured.jsonl`` (one JSON line per result, appended and synced; a line cut short by a
kill is ignored when read) and ``resume/scores/{key}.safetensors`` (written atomically).

Evaluations of an *unpatched* model — the donor's and the target's numbers, which every run of a
pair measures again on the same prompts — are also kept across runs, in ``$CNT_LENS_CACHE/measured/``
(one file per result, written atomically), keyed as above and by the digest of cnt_lens's own
source and prompt files (:func:`code_digest`): a run of the same pair reuses them; any change to
the code, the models, the prompts or the library versions measures them again. ``CNT_LENS_SHARED=0``
turns that cache off (a benchmark timing a first run).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from cnt_lens.core.files import append_jsonl, atomic_write_text, cache_dir, directory_lock
from cnt_lens.core.journal import entries
from cnt_lens.method.selection import NeuronScores
from cnt_lens.models.forward import Model, device_of
from cnt_lens.models.hf import hf_state_dict
from cnt_lens.models.loading import library_versions

__all__ = ["active_directory", "code_digest", "recall_records", "recall_scores", "resumable", "weights_digest"]

log = logging.getLogger(__name__)

_ACTIVE: contextvars.ContextVar["_Store | None"] = contextvars.ContextVar("cnt_lens_resume", default=None)


def weights_digest(model: Model) -> str:
    """sha1 of every weight's row sums (float64), under its plain HF name: any changed weight changes it.

    Sums each tensor on its own device, a few thousand rows at a time, and moves only the sums to the
    host: about one pass over the weights, and unlike a strided sample it sees a change to a single neuron.
    """
    h = hashlib.sha1()
    for name, p in sorted(hf_state_dict(model).items()):
        rows = p.detach().reshape(-1, p.shape[-1]) if p.dim() else p.detach().reshape(1, 1)
        sums = torch.cat([c.double().sum(-1) for c in rows.split(8192)])
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(sums.cpu().numpy().tobytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha1 of cnt_lens's own source and data files (``*.py``, prompts): what a cross-run result also depends on."""
    root = Path(__file__).parent
    h = hashlib.sha1()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _shared_path(key: str) -> Path | None:
    """Where the cross-run cache keeps the result of ``key`` (an unpatched model's); ``None`` when it is off."""
    if os.environ.get("CNT_LENS_SHARED", "1") == "0":
        return None
    name = hashlib.sha1(f"{key}:{code_digest()}".encode()).hexdigest()
    return cache_dir() / "measured" / f"{name}.json"


class _Store:
    """One run directory's remembered results (``{out}/resume``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.records: dict[str, list[dict[str, Any]]] = {}
        self.digests: dict[int, str] = {}
        self.reused = 0
        self.shared = 0  # results reused from the cross-run cache
        self.versions = library_versions()  # once per run, not once per key
        path = root / "measured.jsonl"
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
                    entry = json.loads(line)
                    self.records[entry["key"]] = entry["records"]

    def model_state(self, model: Model) -> str | None:
        """The model's weights digest, device and applied patches' hashes; ``None`` when it cannot be known."""
        digest = self.digests.get(id(model))
        if digest is None:
            if entries(model) or not hasattr(model, "original_model"):
                return None  # first seen patched (its unpatched weights unknown), or not a loaded model
            digest = self.digests[id(model)] = weights_digest(model)
        return "+".join([digest, str(device_of(model)), *(e.key for e in entries(model))])

    def key(self, kind: str, models: Sequence[Any], settings: dict[str, Any]) -> str | None:
        """sha1 of what a result depends on; ``None`` when a model's state cannot be known."""
        states = [self.model_state(m) for m in models]
        if None in states:
            return None
        blob = json.dumps({"kind": kind, "models": states, "settings": settings, "versions": self.versions},
                          sort_keys=True, default=_describe)
        return hashlib.sha1(blob.encode()).hexdigest()

    def add_records(self, key: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append one result to ``measured.jsonl`` and sync it (a kill leaves at most one cut line).

        Returns the records as they will be read back (through JSON), so that a run and its resumed
        rerun aggregate the same values; ``records`` themselves when they are not JSON.
        """
        try:
            line = append_jsonl(self.root / "measured.jsonl", {"key": key, "records": records})
        except (TypeError, ValueError) as err:
            log.warning("not remembered (records are not JSON: %s)", err)
            return records
        self.records[key] = json.loads(line)["records"]
        return [dict(r) for r in self.records[key]]


@contextlib.contextmanager
def resumable(directory: str | Path) -> Iterator[Path]:
    """Remember evaluations and scores under ``{directory}/resume`` for the block; yields that folder.

    Nested blocks on the same directory share one store. Example::

        with resumable("runs/mine"):
            result = transfer(pair, Refusal(), side_effects=[Utility()])  # a rerun reuses every result
    """
    root = Path(directory) / "resume"
    current = _ACTIVE.get()
    if current is not None and current.root == root:
        yield root
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    with directory_lock(directory):  # one writer per run directory
        store = _Store(root)
        if store.records:
            log.info("resuming: %d remembered results in %s", len(store.records), root)
        token = _ACTIVE.set(store)
        try:
            yield root
        finally:
            _ACTIVE.reset(token)
        if store.reused:
            log.info("reused %d remembered results from %s", store.reused, root)
        if store.shared:
            log.info("reused %d donor/target evaluations from %s", store.shared, cache_dir() / "measured")


def active_directory() -> Path | None:
    """The ``resume`` folder results are remembered in now, or ``None`` outside :func:`resumable`."""
    store = _ACTIVE.get()
    return None if store is None else store.root


def recall_records(model: Model, behaviour: Any, split: str | None, *, estimate: bool, batch_size: int,
                   compute: Callable[[], list[dict[str, Any]]], texts: bool = True) -> list[dict[str, Any]]:
    """``compute()`` (a behaviour's per-prompt records for ``model``), or the remembered records of the same call.

    ``texts=False``: records whose responses may end where their verdicts were decided (kept apart from whole ones).
    """
    store = _ACTIVE.get()
    settings = {"behaviour": behaviour, "split": split, "estimate": estimate, "batch_size": batch_size,
                **({} if texts else {"texts": False})}
    key = store and store.key("records", [model], settings)
    if store is None or key is None:
        return compute()
    if key in store.records:
        store.reused += 1
        return [dict(r) for r in store.records[key]]
    shared = None if entries(model) else _shared_path(key)  # an unpatched model's: kept across runs too
    if shared is not None and shared.is_file():
        with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError, OSError):
            records = json.loads(shared.read_text(encoding="utf-8"))["records"]
            store.shared += 1
            return store.add_records(key, records)
    records = store.add_records(key, compute())
    if shared is not None:
        with contextlib.suppress(OSError, TypeError, ValueError):  # a cache that cannot be written is no error
            atomic_write_text(shared, json.dumps({"key": key, "records": records}))
    return records


def recall_scores(models: Sequence[Any], behaviour: Any, settings: dict[str, Any],
                  compute: Callable[[], NeuronScores]) -> NeuronScores:
    """``compute()`` (one scoring pass over ``models``), or the remembered scores of the same pass.

    ``settings`` may hold tensors, selections and behaviours: they are keyed by content.
    """
    store = _ACTIVE.get()
    key = store and store.key("scores", models, {"behaviour": behaviour, **settings})
    if store is None or key is None:
        return compute()
    path = store.root / "scores" / f"{key}.safetensors"
    if path.is_file():
        with contextlib.suppress(ValueError):  # a damaged file is computed again
            scores = NeuronScores.load(path)
            store.reused += 1
            return scores
    scores = compute()
    scores.save(path)
    return scores


def _describe(value: Any) -> str:
    """A key's text for what JSON cannot hold: tensors (and selections' masks) by content, the rest by ``repr``."""
    value = getattr(value, "mask", value)
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        return f"tensor{tuple(t.shape)}{t.dtype}:{hashlib.sha1(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()}"
    return repr(value)
