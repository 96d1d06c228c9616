"""Rows of a user's prompt file, read by path, each with its line number.

UTF-8 text, CSV and JSON lines; every error names the file, the line and the fix.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterator

from cnt_lens.core.errors import CntLensError
from cnt_lens.data.prompt_set import lone_surrogate

__all__ = ["PromptFileError"]


class PromptFileError(CntLensError, ValueError):
    """A prompt file that cannot be read as the format asked for (the message names file, place and fix)."""


# --------------------------------------------------------------------------- reading rows


def read_text(path: Path) -> str:
    """The text of a prompt file: UTF-8, an optional BOM dropped; anything else is a :class:`PromptFileError`.

    The error names the line of the first byte that is not UTF-8 and how to convert the file.
    """
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise PromptFileError(f"{path}: the file is UTF-16 (it starts with a UTF-16 byte-order mark); prompt files "
                              f"must be UTF-8: convert it, e.g. iconv -f UTF-16 -t UTF-8 {path.name}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise PromptFileError(f"{path}:{line}: byte {data[err.start]:#04x} at offset {err.start} is not UTF-8; "
                              f"prompt files must be UTF-8: convert it, e.g. iconv -f latin1 -t UTF-8 {path.name} "
                              "(name the encoding the file was saved in)") from None


def encodable(path: Path, line: int, row: dict[str, Any]) -> dict[str, Any]:
    r"""``row`` if every string in it can be written as UTF-8 (JSON's ``\ud800`` escapes give lone surrogates)."""
    for key, value in row.items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and (bad := lone_surrogate(text)) is not None:
                raise PromptFileError(f"{path}:{line}: field {key!r} holds {bad!r}, a lone UTF-16 surrogate (a "
                                      "\\ud800-\\udfff escape without its pair), which is no character; fix or "
                                      "drop that escape")
    return row


def csv_rows(path: Path) -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    """The header and ``(line, row)`` pairs of a CSV file (UTF-8, an optional BOM tolerated).

    A row with more fields than the header (an unquoted comma, most often) is an error naming the line;
    so is a field longer than :mod:`csv`'s limit (an unbalanced quote runs on to the end of the file).
    """
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    try:
        header = [h for h in (reader.fieldnames or []) if h is not None]
    except csv.Error as err:
        raise csv_error(path, 1, err) from None

    def rows() -> Iterator[tuple[int, dict[str, str]]]:
        line = 1
        try:
            for row in reader:
                if None in row:
                    raise PromptFileError(
                        f"{path}:{reader.line_num}: {len(header) + len(row[None])} fields where the header has "
                        f"{len(header)} ({', '.join(header)}): quote the field that holds a comma, e.g. "
                        f'"{row[None][0][:30]}…" belongs to the field before it')
                line = reader.line_num
                yield line, row
        except csv.Error as err:
            raise csv_error(path, line + 1, err) from None

    return header, rows()


def csv_error(path: Path, line: int, err: csv.Error) -> PromptFileError:
    hint = (f"a field longer than {csv.field_size_limit():,} characters: a quote left open runs on; close it, "
            "or shorten the field") if "field larger" in str(err) else "check the quoting of that row"
    return PromptFileError(f"{path}:{line}: not readable as CSV ({err}): {hint}")


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line, record)`` pairs of a JSON-lines file, or of a ``.json`` file holding one array of records."""
    text = read_text(path)
    lines: Iterator[tuple[int, Any]] = json_lines(path, text)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            lines = enumerate(json.loads(text), 1)  # a JSON array: each item's number stands for its line
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{path}:{err.lineno}: not JSON: {err.msg}") from None
    for n, row in lines:
        if not isinstance(row, dict):
            raise PromptFileError(f"{path}:{n}: a record must be a JSON object, got {type(row).__name__}")
        yield n, encodable(path, n, row)


def json_lines(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as err:
            hint = (" (a .json file holding one JSON document must be an array of records, or use JSON lines: one "
                    "record a line)") if path.suffix.lower() == ".json" else ""
            raise PromptFileError(f"{path}:{n}: not JSON: {err}{hint}") from err


def require_columns(path: Path, header: list[str] | set[str], needed: tuple[str, ...], fmt: str) -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        raise PromptFileError(f"{path}: not a {fmt}: missing column(s) {missing} (it has {sorted(header)}); "
                              f"pass the right --format, or --format csv/jsonl with --column")


def text_of(path: Path, line: int, row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if not isinstance(value, str) or not value.strip():
        raise PromptFileError(f"{path}:{line}: field {column!r} must be a non-empty string, got {value!r:.60}")
    return value.strip()


def rows_of(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a CSV or JSON-lines file, chosen by suffix (``.jsonl``/``.json`` → JSON lines)."""
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return jsonl_rows(path)
    return csv_rows(path)[1]


# --------------------------------------------------------------------------- entry points


def fields_of(path: Path) -> set[str]:
    """The column names of a CSV file or the keys of a JSON-lines file's first record (empty if unreadable)."""
    try:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            return set(next(jsonl_rows(path), (0, {}))[1])
        if path.suffix.lower() == ".json":
            head = read_text(path)[:4096]
            if '"intrasentence"' in head:
                return {"intrasentence"}
            return set(next(jsonl_rows(path), (0, {}))[1])
        return set(csv_rows(path)[0])
    except PromptFileError:
        return set()
