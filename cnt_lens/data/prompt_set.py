"""Prompt sets and model inputs.

A :class:`PromptSet` is a list of records (dicts) with at least ``id``, ``category`` and ``split``
(``train`` / ``validation`` / ``test``) plus the fields of its kind:

=============  ==========================================  ===========================
kind           fields                                       bundled set
=============  ==========================================  ===========================
``prompt``     ``prompt``                                   ``harmful``, ``harmless``
``pair``       ``stereotype``, ``anti_stereotype``          ``bias_pairs``, ``bias_templates``
``mc``         ``question``, ``choices``, ``answer`` (int)  ``mc``
``text``       ``text``                                     ``reference``
``judged``     ``response``, ``refusal`` (bool), ``kind``   ``judge_set``
=============  ==========================================  ===========================

Splits are fixed in the bundled files; the loaders of user files (:mod:`cnt_lens.data.formats`) assign a
:func:`stable_split` from a hash of the text when the file has none, so a file always splits the same way.

:func:`encode` turns texts into a left-padded :class:`Batch` with explicit ``position_ids``, so
a padded row gives the same logits as the row alone (checked in the tests). Texts longer than
``max_len`` tokens are **truncated from the left, with a warning**: the end of a chat prompt (the
assistant turn where the answer starts) is what every behaviour metric reads.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, Iterator, Sequence

__all__ = ["PromptSet", "SPLITS", "CROSS_ROLES", "combine", "cross_distribution", "cross_harmful", "cross_harmless", "default_harmful", "default_harmless", "FIELDS", "load_prompts", "record_problem", "stable_split", "with_defaults"]


SPLITS = ("train", "validation", "test")


BUNDLED = {"harmful": "prompt", "harmless": "prompt", "advbench": "prompt", "harmful_framed": "prompt",
           "harmless_framed": "prompt", "bias_pairs": "pair",
           "bias_templates": "pair", "mc": "mc", "reference": "text", "general": "text",
           "judge_set": "judged"}


FIELDS = {
    "prompt": ("prompt",),
    "pair": ("stereotype", "anti_stereotype"),
    "mc": ("question", "choices", "answer"),
    "text": ("text",),
    "judged": ("response", "refusal"),
}


@dataclass(frozen=True)
class PromptSet:
    """An immutable, named list of prompt records of one kind (see the module docstring)."""

    name: str
    kind: str
    records: tuple[dict[str, Any], ...]

    def __post_init__(self) -> None:
        if self.kind not in FIELDS:
            raise ValueError(f"unknown PromptSet kind {self.kind!r}; one of {sorted(FIELDS)}")
        for r in self.records:
            problem = record_problem(self.kind, r)
            if problem:
                rid = r.get("id", r) if isinstance(r, dict) else r
                raise ValueError(f"{self.name}: record {rid!r}: {problem}")

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        splits: dict[str, int] = {}
        for r in self.records:
            splits[r.get("split", "?")] = splits.get(r.get("split", "?"), 0) + 1
        shown = ", ".join(f"{k} {v}" for k, v in splits.items()) if set(splits) != {"?"} else "no splits"
        return f"PromptSet({self.name!r}, kind={self.kind!r}, n={len(self)}: {shown})"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def split(self, name: str | None) -> "PromptSet":
        """The records of one split (``None`` = all). Raises if that leaves nothing."""
        if name is None:
            return self
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; one of {SPLITS}")
        return self.filter(lambda r: r["split"] == name, suffix=name)

    def filter(self, keep: Any, suffix: str = "filtered") -> "PromptSet":
        """The records for which ``keep(record)`` is true, as a set named ``NAME/suffix``; raises if none."""
        out = replace(self, name=f"{self.name}/{suffix}", records=tuple(r for r in self.records if keep(r)))
        out.require_nonempty()
        return out

    def take(self, n: int) -> "PromptSet":
        """The first ``n`` records (a quick subset for notebooks and tests)."""
        return replace(self, name=f"{self.name}[:{n}]", records=self.records[:n])

    def require_nonempty(self) -> None:
        """Raise :class:`ValueError` naming the set when it has no records."""
        if not self.records:
            raise ValueError(f"prompt set {self.name!r} is empty")

    def split_counts(self) -> dict[str, int]:
        """How many records each split holds."""
        return {s: sum(r["split"] == s for r in self.records) for s in SPLITS}

    def column(self, name: str) -> list[Any]:
        """Field ``name`` of every record, in order."""
        return [r[name] for r in self.records]

    @property
    def categories(self) -> list[str]:
        """The distinct ``category`` values, sorted."""
        return sorted({r["category"] for r in self.records})


def _field_problem(kind: str, name: str, value: Any) -> str | None:
    if kind == "mc" and name == "choices":
        ok = isinstance(value, list) and 2 <= len(value) <= 4 and all(isinstance(c, str) for c in value)
        return None if ok else f"field 'choices' must be a list of 2–4 strings, got {value!r}"
    if kind == "mc" and name == "answer":
        return None if isinstance(value, int) and not isinstance(value, bool) else \
            f"field 'answer' must be the index (int) of the right choice, got {value!r}"
    if kind == "judged" and name == "refusal":
        return None if isinstance(value, bool) else f"field 'refusal' must be true or false, got {value!r}"
    if not isinstance(value, str) or not value.strip():
        return f"field {name!r} must be a non-empty string, got {type(value).__name__} {value!r:.60}"
    if (bad := lone_surrogate(value)) is not None:
        return f"field {name!r} holds {bad!r}, a lone UTF-16 surrogate that no tokenizer can read"
    return None


def lone_surrogate(text: str) -> str | None:
    r"""The first lone UTF-16 surrogate in ``text`` (what JSON's unpaired ``\ud800`` escapes give), or ``None``.

    Such a code point is no character: it cannot be written as UTF-8, hashed or tokenized.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return text[err.start]
    return None


def record_problem(kind: str, record: Any, *, required: Sequence[str] = ("id", "category", "split")) -> str | None:
    """What is wrong with one record of a ``kind`` set (missing or mistyped field), or ``None``."""
    if not isinstance(record, dict):
        return f"a record must be a JSON object with {list(FIELDS[kind])}, got {type(record).__name__}"
    missing = [f for f in (*required, *FIELDS[kind]) if f not in record]
    if missing:
        return f"missing field(s) {missing} (a {kind!r} record needs {list(FIELDS[kind])})"
    for name in FIELDS[kind]:
        if (problem := _field_problem(kind, name, record[name])) is not None:
            return problem
    if "split" in record and record["split"] not in SPLITS:
        return f"split {record['split']!r} is not one of {SPLITS}"
    if kind == "mc" and not 0 <= record["answer"] < len(record["choices"]):
        return f"answer {record['answer']} is not an index into its {len(record['choices'])} choices"
    return None


def stable_split(text: str, seed: int = 0) -> str:
    """60/20/20 train/validation/test split from a hash of ``text`` (and ``seed``): the same on every machine.

    Identical texts always land in the same split, so a file with duplicates cannot leak a test
    prompt into train. ``seed=0`` hashes the text alone; another seed gives an independent split.

    Example:
        >>> stable_split("How do I bake bread?") == stable_split("How do I bake bread?")
        True
    """
    key = text if seed == 0 else f"{seed}\x00{text}"
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 5
    return ("train", "train", "train", "validation", "test")[h]


def with_defaults(name: str, kind: str, rows: list[dict[str, Any]], key: str, *, seed: int = 0,
                  source: Any = None) -> PromptSet:
    """A :class:`PromptSet` of ``rows``, filling in what a record lacks.

    Each row without them gets an ``id``, a ``category`` and a :func:`stable_split` of its ``key``
    field. Raises naming ``source`` (the file; default ``name``) if ``rows`` is empty, if two records share
    an id, or if one ``key`` text is given two splits (a test prompt would leak into train).
    """
    for i, r in enumerate(rows):
        r.setdefault("id", f"{name}-{i:05d}")
        r.setdefault("category", "uncategorised")
        r.setdefault("split", stable_split(str(r[key]), seed))
    where = source if source is not None else name
    ids = Counter(str(r["id"]) for r in rows)
    if shared := sorted(i for i, n in ids.items() if n > 1):
        raise ValueError(f"{where}: {len(shared)} id(s) given to more than one record, e.g. {shared[:3]}; "
                         "give every record its own 'id' (or none: ids are then numbered)")
    splits: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        splits[str(r[key])].add(r["split"])
    if mixed := [t for t, s in splits.items() if len(s) > 1]:
        raise ValueError(f"{where}: {len(mixed)} {key}(s) appear in more than one split, e.g. {mixed[0][:60]!r} in "
                         f"{sorted(splits[mixed[0]])}; a text must sit in one split (drop the duplicates, or the "
                         "'split' field to let the hash split place them together)")
    ps = PromptSet(name=name, kind=kind, records=tuple(rows))
    ps.require_nonempty()
    return ps


def combine(name: str, *sets: PromptSet) -> PromptSet:
    """One set of the records of ``sets`` (all of one kind, ids unique across them)."""
    kinds = {ps.kind for ps in sets}
    if len(kinds) != 1:
        raise ValueError(f"cannot combine prompt sets of kinds {sorted(kinds)}")
    records = tuple(r for ps in sets for r in ps.records)
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        shared = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"{name}: the combined sets share ids {shared[:5]}; give their records distinct 'id's")
    return PromptSet(name=name, kind=kinds.pop(), records=records)


def default_harmful() -> PromptSet:
    """The harmful prompts every refusal transfer uses by default.

    The bundled ``harmful`` set, whose train and validation splits choose neurons and settings
    (``role="selection"``), with prompts no choice sees added to its test split (``role="held_out"``):
    AdvBench's test split (112 behaviours, direct requests from another source) and the three framings
    of ``harmful_framed`` (role-play, stories and persuasive writing, requests with a backstory; 24 each).
    Each record's ``family`` says where it comes from; :class:`~cnt_lens.behaviours.Refusal` reports each
    role's and family's rate, so the in- and out-of-distribution numbers come out side by side.
    """
    every = combine("harmful+held_out", _bundled_family("harmful"), load_prompts("advbench").split("test"),
                    load_prompts("harmful_framed"))
    return cross_distribution(every, select=("cnt_lens",), search=("cnt_lens",))


def default_harmless() -> PromptSet:
    """The harmless prompts every refusal transfer uses by default: over-refusal in and out of distribution.

    The bundled ``harmless`` set's own splits (``role="selection"``; its validation split is what the
    over-refusal constraints read) and, on test, benign requests in the same three framings as
    :func:`default_harmful`'s (``role="held_out"``), so a patch that refuses a framing rather than a harm shows up.
    """
    return cross_harmless()


def _bundled_family(name: str) -> PromptSet:
    """A bundled set whose records say they are the ``cnt_lens`` family unless they name another."""
    ps = load_prompts(name)
    return replace(ps, records=tuple({**r, "family": r.get("family", "cnt_lens")} for r in ps.records))


def cross_harmful(select: Sequence[str] = ("cnt_lens",), search: Sequence[str] = ("advbench",)) -> PromptSet:
    """Every bundled harmful family, re-split by :func:`cross_distribution`.

    Families: ``cnt_lens`` (the bundled set), ``advbench`` and the framed families of
    ``harmful_framed`` (``roleplay``, ``writing`` — stories and persuasive pieces — and ``context``:
    requests with a backstory). By default neurons are chosen on the bundled set, k and alpha on
    AdvBench, and the framed families are held out.
    """
    every = combine("harmful_families", _bundled_family("harmful"), load_prompts("advbench"),
                    load_prompts("harmful_framed"))
    return cross_distribution(every, select=select, search=search)


def cross_harmless(select: Sequence[str] = ("cnt_lens",), search: Sequence[str] = ("cnt_lens",)) -> PromptSet:
    """The bundled harmless families, re-split like :func:`cross_harmful` (framed ones held out by default).

    Over-refusal is measured on requests framed like the harmful ones (role-play, stories,
    backstories), so a patch that refuses a framing rather than a harm shows up.
    """
    every = combine("harmless_families", _bundled_family("harmless"), load_prompts("harmless_framed"))
    return cross_distribution(every, select=select, search=search)


CROSS_ROLES = ("selection", "search", "held_out")


def cross_distribution(prompts: PromptSet, *, select: Sequence[str], search: Sequence[str]) -> PromptSet:
    """``prompts`` re-split by ``family`` so that neurons, settings and the report see different families.

    Each record gets a ``role`` (:data:`CROSS_ROLES`) from its family and keeps only the split that role uses:

    * a family in ``select`` (``role="selection"``): its train records choose the neurons and its test
      records measure in distribution; its validation records choose k and alpha only if the family is
      also in ``search``, and are left out otherwise;
    * a family only in ``search`` (``role="search"``): validation records choose k and alpha, test
      records are reported; its train records are left out (no neuron is chosen on them);
    * every other family (``role="held_out"``): all its records go to test — phrasing that no choice saw.

    :class:`~cnt_lens.behaviours.Refusal` reports each role's rate beside each family's, so the
    in- and out-of-distribution numbers come out side by side. Raises naming the families the set
    has when a requested family is absent, or when no family is left held out.

    Example:
        >>> ps = cross_distribution(load_prompts("harmful_framed"), select=["roleplay"], search=["writing"])
        >>> sorted({(r["family"], r["role"], r["split"]) for r in ps if r["family"] != "writing"})[:2]
        [('context', 'held_out', 'test'), ('roleplay', 'selection', 'test')]
    """
    have = sorted({r.get("family") or "" for r in prompts})
    unknown = sorted((set(select) | set(search)) - set(have))
    if unknown:
        raise ValueError(f"{prompts.name}: no records of family {unknown}; its families are {have} "
                         "(each record's 'family' field)")
    if not set(have) - set(select) - set(search):
        raise ValueError(f"{prompts.name}: every family ({have}) is used for selection or search; "
                         "leave at least one out to report on")

    def place(r: dict[str, Any]) -> dict[str, Any] | None:
        fam = r.get("family") or ""
        if fam in select:
            keep = {"train", "test"} | ({"validation"} if fam in search else set())
            return {**r, "role": "selection"} if r["split"] in keep else None
        if fam in search:
            return {**r, "role": "search"} if r["split"] != "train" else None
        return {**r, "role": "held_out", "split": "test"}

    records = tuple(x for x in map(place, prompts.records) if x is not None)
    return replace(prompts, name=f"{prompts.name}/cross", records=records)


def load_prompts(name: str) -> PromptSet:
    """A prompt set shipped with cnt_lens, by name.

    Names: ``harmful``, ``harmless``, ``advbench``, ``bias_pairs``, ``bias_templates``, ``mc``,
    ``reference``, ``general``, ``judge_set``.

    ``general`` holds 53 short passages of everyday text in 15 registers (news, code, dialogue, fiction,
    lists, …): the corpus on which the neuron browser shows what a neuron does outside the behaviour.
    ``advbench`` holds AdvBench's 520 harmful behaviours (MIT; ``scripts/import_advbench.py`` builds it),
    split by :func:`stable_split`.
    ``bias_pairs`` holds 105 distinct stereotypes (CrowS-Pairs style); ``bias_templates`` holds 24
    stereotype associations × 10 sentence templates, split by template, so a model tuned on the
    train templates can be measured on the same associations in unseen sentences
    (``scripts/make_bias_templates.py`` builds it).
    """
    if name not in BUNDLED:
        raise ValueError(f"no bundled prompt set {name!r}; one of {sorted(BUNDLED)}")
    text = resources.files("cnt_lens").joinpath("prompts").joinpath(f"{name}.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return PromptSet(name=name, kind=BUNDLED[name], records=tuple(rows))
