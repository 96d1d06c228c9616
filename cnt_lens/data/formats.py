r"""Prompt files in the formats public benchmarks really ship, read by path into :class:`~cnt_lens.data.PromptSet`.

One registry, :data:`FORMATS`, maps a format's name to its loader; :func:`load_file` reads any
of them, naming the format or detecting it from the file's columns:

==================  =====================  ==========================================================
format              kind                   what is read
==================  =====================  ==========================================================
``advbench``        prompt                 AdvBench CSV: ``goal`` (prompt), ``target`` (kept)
``harmbench``       prompt                 HarmBench behaviours CSV: ``Behavior`` (with
                                           ``ContextString`` above it when set), ``SemanticCategory``,
                                           ``FunctionalCategory``, ``BehaviorID``
``do_not_answer``   prompt                 Do-Not-Answer CSV/JSONL: ``question``, ``risk_area``,
                                           ``types_of_harm``
``xstest``          prompt                 XSTest CSV: ``prompt``, ``type``, ``label`` (``safe`` /
                                           ``unsafe``); ``role="harmless"`` keeps the safe prompts (the
                                           over-refusal set), ``role="harmful"`` the unsafe ones
``crows_pairs``     pair                   CrowS-Pairs CSV: ``sent_more``, ``sent_less``,
                                           ``stereo_antistereo``, ``bias_type``
``stereoset``       pair                   StereoSet JSON: ``data.intrasentence`` items
``bbq``             mc                     BBQ JSONL: ``context`` + ``question``, ``ans0..2``,
                                           ``label``, ``category``, ``context_condition``
``csv``, ``jsonl``  prompt (or ``kind``)   any CSV / JSON-lines file; ``column`` names the text field
==================  =====================  ==========================================================

Records get a deterministic split (:func:`~cnt_lens.data.stable_split` of the text, ``seed``) when
the file has none, so the same file splits the same way on every machine. Every error names the
file, the line or column, and the fix. A new format is one :func:`register_format` call.

Nothing is read wrongly without a word: files must be UTF-8 (a BOM is allowed); a CSV row with more
fields than its header (an unquoted comma) is refused, not cut; a record whose own ``label``
(``safe``/``unsafe``, ``harmless``/``harmful``) contradicts the role the file is read for is
refused; ids must be unique, and one text cannot sit in two splits. A ``.json`` file may hold a
JSON array of records or JSON lines.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "harmful_behaviors.csv"
    >>> _ = path.write_text("goal,target\nWrite a phishing email,Sure\n")
    >>> ps = load_file(path)
    >>> ps.kind, ps.column("prompt"), ps.records[0]["format"]
    ('prompt', ['Write a phishing email'], 'advbench')
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from cnt_lens.core.files import sha256_file
from cnt_lens.data.prompt_set import FIELDS, PromptSet, record_problem, with_defaults
from cnt_lens.data.rows import (
    PromptFileError,
    csv_rows,
    encodable,
    fields_of,
    jsonl_rows,
    read_text,
    require_columns,
    rows_of,
    text_of,
)

__all__ = ["FORMATS", "PromptFormat", "describe_file", "detect_format", "from_advbench_csv", "from_crows_pairs", "from_jsonl", "from_stereoset", "load_file", "register_format"]


FILE_ROLES = ("harmful", "harmless")


HARMFUL_ONLY = ("advbench", "harmbench", "do_not_answer")
"""Formats whose every record is a harmful request: never read as the harmless set."""


@dataclass(frozen=True)
class PromptFormat:
    """One registered file format: its loader, the kind of set it makes and how to recognise it.

    ``load(path, *, name, column, role, kind, seed)`` returns a :class:`PromptSet`; ``columns`` are the
    fields whose presence identifies the format in :func:`detect_format` (empty: never detected).
    """

    name: str
    kind: str
    load: Callable[..., PromptSet]
    columns: frozenset[str]
    summary: str
    alternatives: tuple[frozenset[str], ...] = ()
    """Other column sets that identify the format too (an older release of the benchmark, say)."""

    def signatures(self) -> tuple[frozenset[str], ...]:
        """Every column set that identifies the format, :attr:`columns` first (none: never detected)."""
        return tuple(c for c in (self.columns, *self.alternatives) if c)


FORMATS: dict[str, PromptFormat] = {}


def register_format(name: str, *, kind: str, columns: tuple[str, ...] = (), summary: str = "",
                    alternatives: tuple[tuple[str, ...], ...] = ()) -> Callable:
    """Decorator: register ``load`` as format ``name`` (see :class:`PromptFormat`)."""

    def deco(load: Callable[..., PromptSet]) -> Callable[..., PromptSet]:
        if name in FORMATS:
            raise ValueError(f"prompt format {name!r} is already registered")
        FORMATS[name] = PromptFormat(name, kind, load, frozenset(columns), summary or (load.__doc__ or "").split("\n")[0],
                                     tuple(frozenset(a) for a in alternatives))
        return load

    return deco


# --------------------------------------------------------------------------- harmful-request benchmarks


@register_format("advbench", kind="prompt", columns=("goal",))
def from_advbench_csv(path: str | Path, *, name: str | None = None, seed: int = 0, **_: Any) -> PromptSet:
    """AdvBench CSV (``goal``, ``target``): each goal is a prompt; its target completion is kept."""
    path = Path(path)
    header, rows = csv_rows(path)
    require_columns(path, header, ("goal",), "AdvBench CSV")
    out = [{"prompt": text_of(path, n, r, "goal"), "target": r.get("target") or "", "category": r.get("category") or "advbench"}
           for n, r in rows]
    return with_defaults(name or path.stem, "prompt", out, "prompt", seed=seed, source=path)


@register_format("harmbench", kind="prompt", columns=("Behavior", "SemanticCategory"))
def from_harmbench_csv(path: str | Path, *, name: str | None = None, seed: int = 0, **_: Any) -> PromptSet:
    """HarmBench behaviours CSV (``Behavior``, ``FunctionalCategory``, ``SemanticCategory``, ``ContextString``).

    A contextual behaviour's ``ContextString`` is put above the request, separated by ``---``, as
    HarmBench's own prompts do; ``category`` is the semantic category.
    """
    path = Path(path)
    header, rows = csv_rows(path)
    require_columns(path, header, ("Behavior", "SemanticCategory"), "HarmBench behaviours CSV")
    out = []
    for n, r in rows:
        request, context = text_of(path, n, r, "Behavior"), (r.get("ContextString") or "").strip()
        rec = {"prompt": f"{context}\n\n---\n\n{request}" if context else request,
               "category": (r.get("SemanticCategory") or "").strip() or "uncategorised",
               "functional_category": (r.get("FunctionalCategory") or "").strip()}
        if r.get("BehaviorID"):
            rec["id"] = r["BehaviorID"]
        out.append(rec)
    return with_defaults(name or path.stem, "prompt", out, "prompt", seed=seed, source=path)


@register_format("do_not_answer", kind="prompt", columns=("question", "risk_area"))
def from_do_not_answer(path: str | Path, *, name: str | None = None, seed: int = 0, **_: Any) -> PromptSet:
    """Do-Not-Answer CSV or JSONL (``question``, ``risk_area``, ``types_of_harm``, ``specific_harms``)."""
    path = Path(path)
    out = []
    for n, r in rows_of(path):
        if n <= 2:
            require_columns(path, set(r), ("question", "risk_area"), "Do-Not-Answer file")
        rec = {"prompt": text_of(path, n, r, "question"), "category": str(r.get("risk_area") or "uncategorised"),
               "types_of_harm": str(r.get("types_of_harm") or "")}
        if r.get("id") not in (None, ""):
            rec["id"] = f"dna-{r['id']}"
        out.append(rec)
    return with_defaults(name or path.stem, "prompt", out, "prompt", seed=seed, source=path)


@register_format("xstest", kind="prompt", columns=("prompt", "type", "label"), alternatives=(("prompt", "type", "focus"),))
def from_xstest(path: str | Path, *, name: str | None = None, role: str | None = None, seed: int = 0,
                **_: Any) -> PromptSet:
    """XSTest CSV (``prompt``, ``type``, ``label``), one role or both.

    ``role="harmless"`` keeps the safe prompts, ``"harmful"`` the unsafe ones, ``None`` both (each
    record's ``label`` says which).

    Files without a ``label`` column (XSTest v1) mark unsafe prompts by a ``type`` starting ``contrast_``.
    """
    if role not in (None, *FILE_ROLES):
        raise ValueError(f"role must be one of {FILE_ROLES} or None, got {role!r}")
    path = Path(path)
    header, rows = csv_rows(path)
    require_columns(path, header, ("prompt", "type"), "XSTest CSV")
    out = []
    for n, r in rows:
        kind = (r.get("type") or "").strip()
        label = (r.get("label") or "").strip().lower() or ("unsafe" if kind.startswith("contrast_") else "safe")
        if label not in ("safe", "unsafe"):
            raise PromptFileError(f"{path}:{n}: label must be 'safe' or 'unsafe', got {label!r}")
        if role is None or (label == "safe") == (role == "harmless"):
            rec = {"prompt": text_of(path, n, r, "prompt"), "category": kind or "uncategorised", "label": label}
            if r.get("id"):
                rec["id"] = f"xstest-{r['id']}"
            out.append(rec)
    if not out:
        raise PromptFileError(f"{path}: no {'safe' if role == 'harmless' else 'unsafe'} prompts for role {role!r}")
    return with_defaults(name or path.stem, "prompt", out, "prompt", seed=seed, source=path)


# --------------------------------------------------------------------------- bias benchmarks


@register_format("crows_pairs", kind="pair", columns=("sent_more", "sent_less"))
def from_crows_pairs(path: str | Path, *, name: str | None = None, seed: int = 0, **_: Any) -> PromptSet:
    """CrowS-Pairs CSV (``sent_more``, ``sent_less``, ``stereo_antistereo``, ``bias_type``).

    Rows marked ``antistereo`` have their sentences swapped so that ``stereotype`` is always the
    stereotyping one.
    """
    path = Path(path)
    header, rows = csv_rows(path)
    require_columns(path, header, ("sent_more", "sent_less"), "CrowS-Pairs CSV")
    out = []
    for n, r in rows:
        more, less = text_of(path, n, r, "sent_more"), text_of(path, n, r, "sent_less")
        if _orientation(path, n, r.get("stereo_antistereo")) == "antistereo":
            more, less = less, more
        out.append({"stereotype": more, "anti_stereotype": less, "category": r.get("bias_type") or "uncategorised"})
    return with_defaults(name or path.stem, "pair", out, "stereotype", seed=seed, source=path)


def _orientation(path: Path, line: int, value: str | None) -> str:
    """``stereo`` or ``antistereo`` from a CrowS-Pairs label in any case or spelling (``Anti-stereo``); empty: stereo."""
    key = "".join(ch for ch in (value or "stereo").lower() if ch.isalpha())
    if key not in ("stereo", "antistereo"):
        raise PromptFileError(f"{path}:{line}: stereo_antistereo must be 'stereo' or 'antistereo', got {value!r}")
    return key


def _stereoset_pair(path: Path, i: int, item: Any) -> dict[str, Any] | None:
    """One intrasentence item as a pair record (``None`` when it lacks either gold sentence)."""
    where = f"{path}: data.intrasentence[{i}]" + (f" (id {item.get('id')!r})" if isinstance(item, dict) else "")
    sentences = item.get("sentences") if isinstance(item, dict) else None
    if not isinstance(sentences, list):
        raise PromptFileError(f"{where}: no 'sentences' list; each item needs sentences with 'sentence' and "
                              "'gold_label'")
    by_label = {}
    for j, s in enumerate(sentences):
        if not isinstance(s, dict) or not isinstance(s.get("sentence"), str) or "gold_label" not in s:
            raise PromptFileError(f"{where}: sentences[{j}] needs a 'sentence' string and a 'gold_label'")
        by_label[s["gold_label"]] = s["sentence"]
    if "stereotype" not in by_label or "anti-stereotype" not in by_label:
        return None
    return {"id": item.get("id"), "stereotype": by_label["stereotype"], "anti_stereotype": by_label["anti-stereotype"],
            "category": item.get("bias_type", "uncategorised")}


@register_format("stereoset", kind="pair")
def from_stereoset(path: str | Path, *, name: str | None = None, seed: int = 0, **_: Any) -> PromptSet:
    """StereoSet JSON (``data.intrasentence`` items with stereotype / anti-stereotype sentences)."""
    path = Path(path)
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise PromptFileError(f"{path}: not JSON: {err}") from err
    items = (data.get("data", data) if isinstance(data, dict) else {}).get("intrasentence")
    if not isinstance(items, list):
        raise PromptFileError(f"{path}: not a StereoSet file: no 'data' → 'intrasentence' list")
    out = [encodable(path, i, rec) for i, item in enumerate(items) if (rec := _stereoset_pair(path, i, item))]
    return with_defaults(name or path.stem, "pair", out, "stereotype", seed=seed, source=path)


@register_format("bbq", kind="mc", columns=("context", "question", "ans0", "label"))
def from_bbq(path: str | Path, *, name: str | None = None, seed: int = 0, **_: Any) -> PromptSet:
    """BBQ JSONL: ``context`` and ``question`` make the question; ``ans0..2`` the choices, ``label`` the answer.

    ``context_condition`` (``ambig``: the right answer is "unknown"), ``question_polarity`` and
    ``answer_info`` are kept, so a bias score can be computed from the items.
    """
    path = Path(path)
    out = []
    for n, r in jsonl_rows(path):
        require_columns(path, set(r), ("context", "question", "ans0", "ans1", "ans2", "label"), f"BBQ JSONL (line {n})")
        rec = {"question": f"{text_of(path, n, r, 'context')} {text_of(path, n, r, 'question')}",
               "choices": [str(r[f"ans{i}"]) for i in range(3)], "answer": r["label"],
               "category": str(r.get("category") or "uncategorised"),
               **{k: r[k] for k in ("context_condition", "question_polarity", "answer_info") if k in r}}
        if "example_id" in r:
            rec["id"] = f"bbq-{rec['category']}-{r['example_id']}"
        if (problem := record_problem("mc", rec, required=())) is not None:
            raise PromptFileError(f"{path}:{n}: {problem}")
        out.append(rec)
    return with_defaults(name or path.stem, "mc", out, "question", seed=seed, source=path)


# --------------------------------------------------------------------------- generic files


LABEL_ROLES = {"unsafe": "harmful", "harmful": "harmful", "safe": "harmless", "harmless": "harmless",
               "benign": "harmless"}
"""What a record's own ``label`` says its role is (compared lower-case): a file read for the other role refuses it."""


def _check_role(path: Path, line: int, row: dict[str, Any], role: str | None) -> None:
    label = row.get("label")
    said = LABEL_ROLES.get(label.strip().lower()) if isinstance(label, str) else None
    if role in FILE_ROLES and said is not None and said != role:
        raise PromptFileError(
            f"{path}:{line}: the record's label is {label!r} ({said}), but the file is read as the {role} set; "
            f"keep only {role} records in it, or read a file that holds both with its format "
            "(--format xstest keeps the safe prompts for --harmless and the unsafe ones for --harmful)")


def _generic(path: Path, rows: Iterator[tuple[int, dict[str, Any]]], *, kind: str, column: str | None,
             name: str | None, seed: int, flag: str, role: str | None = None) -> PromptSet:
    if kind not in FIELDS:
        raise ValueError(f"unknown kind {kind!r}; one of {sorted(FIELDS)}")
    key = FIELDS[kind][0]
    out = []
    for n, row in rows:
        _check_role(path, n, row, role)
        if column is not None:
            if column not in row:
                raise PromptFileError(f"{path}:{n}: no field {column!r} ({flag}); the record has {sorted(row)}")
            row[key] = row.pop(column)
        row = {k: v for k, v in row.items() if k is not None}
        if (problem := record_problem(kind, row, required=())) is not None:
            hint = f"; pass {flag} to read another field as {key!r}" if "missing" in problem else ""
            raise PromptFileError(f"{path}:{n}: {problem}{hint}")
        out.append(row)
    return with_defaults(name or path.stem, kind, out, key, seed=seed, source=path)


@register_format("jsonl", kind="prompt")
def from_jsonl(path: str | Path, *, kind: str = "prompt", text_field: str | None = None, column: str | None = None,
               name: str | None = None, seed: int = 0, role: str | None = None, **_: Any) -> PromptSet:
    """Records from a JSON-lines file; ``column`` (alias ``text_field``) names the field read as ``prompt``/``text``.

    Every line is checked: an error names the file, the line, the field and what it should be. With a
    ``role``, a record whose ``label`` says the other role is refused.
    """
    path = Path(path)
    return _generic(path, jsonl_rows(path), kind=kind, column=column or text_field, name=name, seed=seed,
                    flag="text_field= / --column", role=role)


@register_format("csv", kind="prompt")
def from_csv(path: str | Path, *, kind: str = "prompt", column: str | None = None, name: str | None = None,
             seed: int = 0, role: str | None = None, **_: Any) -> PromptSet:
    """Rows of any CSV file with a header; ``column`` names the column read as ``prompt``/``text``.

    With a ``role``, a row whose ``label`` says the other role is refused.
    """
    path = Path(path)
    return _generic(path, csv_rows(path)[1], kind=kind, column=column, name=name, seed=seed, flag="--column",
                    role=role)


def _kind_of(path: Path, column: str | None) -> str:
    """The kind of a generic file, read from its first record's fields.

    The first of ``pair``, ``mc``, ``judged``, ``text`` whose fields the record has (``prompt`` when
    none, or when a ``column`` is named).
    """
    fields = fields_of(path)
    if column is None:
        for kind in ("pair", "mc", "judged", "text"):
            if set(FIELDS[kind]) <= fields:
                return kind
    return "prompt"


def detect_format(path: str | Path) -> str:
    """The registered format whose identifying columns ``path`` has (the most specific match wins).

    Falls back to ``jsonl``/``csv`` by suffix; a StereoSet file is recognised by its ``intrasentence`` key.
    """
    path = Path(path)
    fields = fields_of(path)
    if "intrasentence" in fields:
        return "stereoset"
    matches = sorted(((len(sig), f.name) for f in FORMATS.values() for sig in f.signatures() if sig <= fields),
                     key=lambda m: -m[0])
    if matches:
        return matches[0][1]
    return "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson", ".json") else "csv"


def load_file(path: str | Path, format: str | None = None, *, column: str | None = None, role: str | None = None,
              kind: str | None = None, name: str | None = None, seed: int = 0) -> PromptSet:
    """Read a prompt file of any registered format (``format=None``: :func:`detect_format`).

    ``role`` (``"harmful"``/``"harmless"``) picks a side of files that hold both (XSTest), and is honoured
    by every reader: a harmful-only benchmark read as the harmless set, or a record whose ``label``
    says the other role, is refused;
    ``column`` and ``kind`` apply to the generic ``csv``/``jsonl`` formats (``kind=None``: the kind whose
    fields the first record has, e.g. ``pair`` for ``stereotype``/``anti_stereotype``; else ``prompt``); ``seed`` re-draws the
    hash split of records that have no ``split`` field. Every record gets ``format`` set to the
    format read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file")
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; one of {sorted(FORMATS)}")
    spec = FORMATS[fmt]
    if column is not None and fmt not in ("csv", "jsonl"):
        raise ValueError(f"{path}: column= / --column applies to the generic csv and jsonl formats, not {fmt!r}")
    if kind is not None and kind != spec.kind and fmt not in ("csv", "jsonl"):
        raise ValueError(f"{path}: format {fmt!r} makes {spec.kind!r} sets, not {kind!r}")
    if role == "harmless" and fmt in HARMFUL_ONLY:
        raise PromptFileError(f"{path}: a {fmt} file holds harmful requests only, and it is read as the harmless set; "
                              "give it as the harmful set, and a file of benign prompts as the harmless one")
    extra = {"kind": kind or _kind_of(path, column), "column": column} if fmt in ("csv", "jsonl") else {}
    ps = spec.load(path, name=name, role=role, seed=seed, **extra)
    for r in ps.records:
        r.setdefault("format", fmt)
    return ps


def describe_file(path: str | Path, ps: PromptSet) -> dict[str, Any]:
    """What a run records about a prompt file: path, sha256, format, record count and the split of every id."""
    path = Path(path)
    digest = sha256_file(path)
    formats = sorted({r.get("format", "?") for r in ps.records})
    return {"path": str(path), "sha256": digest, "format": formats[0] if len(formats) == 1 else formats,
            "kind": ps.kind, "n": len(ps), "splits": ps.split_counts(), "split_of": {str(r["id"]): r["split"] for r in ps.records}}
