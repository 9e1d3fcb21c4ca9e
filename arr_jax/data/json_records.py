"""Records from ``.json`` / ``.jsonl`` data files, the format taken from the file's extension.

* ``.jsonl`` (or ``.ndjson``): one JSON object per non-blank line; a file of one line is a list of
  one record. ``.json``: one JSON document, an array of objects (or, where the reader names a
  ``key``, an object holding such an array under that key, e.g. MMRB2's ``{"pairs": [...]}``).
* Files are read as ``utf-8-sig``: a UTF-8 byte-order mark is skipped.
* Every error is a ``ValueError`` that names the file, and the line (JSONL; line and column for a
  syntax error) or record index (JSON). When the content disagrees with the extension (a ``.json``
  file holding one object per line, a ``.jsonl`` file holding one multi-line document) the error
  says so and which extension would fit.

We do not guess the format by trial parsing: a JSONL file with a single record would otherwise be
read as one JSON object and its keys iterated as records.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

JSON_SUFFIXES = (".json",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclasses.dataclass(frozen=True)
class Record:
    """One record: ``data`` (a dict), ``number`` (its JSONL line, or 1-based position in the JSON
    array) and ``where`` (``"<file>:<line>"`` or ``"<file>: record <i>"``) for error messages."""

    data: dict
    number: int
    where: str


def json_type(v: Any) -> str:
    """The JSON name of a parsed value's type (object, array, string, number, boolean, null)."""
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    return "null" if v is None else type(v).__name__


def data_format(path: str | os.PathLike) -> str:
    """``"json"`` or ``"jsonl"`` from the extension of ``path``; ValueError naming the file otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    raise ValueError(f"{path}: unknown data file extension {suffix or '(none)'!r}; expected .json (one JSON "
                     f"document) or .jsonl (one JSON object per line)")


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def _parses(s: str) -> bool:
    try:
        json.loads(s)
    except ValueError:
        return False
    return True


def read_json(path: str | os.PathLike) -> Any:
    """The one JSON document of a ``.json`` file (any top-level type); ValueError naming the file,
    line and column of a syntax error, and saying so when the file is JSON Lines instead."""
    path = Path(path)
    if data_format(path) != "json":
        raise ValueError(f"{path}: read_json reads .json files; this one is {path.suffix}")
    text = _text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) > 1 and all(_parses(ln) for ln in lines):
            raise ValueError(f"{path}:{e.lineno}: the file holds one JSON value per line (JSON Lines) but its "
                             f"extension .json says one JSON document; rename it to .jsonl") from None
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None


def _jsonl_values(path: Path) -> list[tuple[int, Any]]:
    text = _text(path)
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            if _parses(text):
                raise ValueError(f"{path}:{n}: not one JSON value per line (JSON Lines): the file is one JSON "
                                 f"document spread over lines; rename it to .json") from None
            raise ValueError(f"{path}:{n}:{e.colno}: not valid JSON ({e.msg})") from None
    return out


def load_records(path: str | os.PathLike, *, key: str | None = None) -> list[Record]:
    """The records (JSON objects) of a ``.json`` or ``.jsonl`` file, in file order.

    ``.jsonl``: one object per non-blank line. ``.json``: an array of objects, or (with ``key``) an
    object whose ``key`` holds that array (``where`` then reads ``"<file>: <key>[<i>]"``). Raises ValueError naming the file (and line / record)
    for an unknown extension, a syntax error, content that does not fit the extension, another
    container type, or a record that is not an object.
    """
    path = Path(path)
    if data_format(path) == "jsonl":
        values = _jsonl_values(path)
        for n, v in values:
            if not isinstance(v, dict):
                hint = " (a JSON array of records belongs in a .json file)" if isinstance(v, list) else ""
                raise ValueError(f"{path}:{n}: expected a JSON object per line, got {json_type(v)}{hint}")
        return [Record(v, n, f"{path}:{n}") for n, v in values]
    doc = read_json(path)
    items, keyed = doc, False
    if key is not None and isinstance(doc, dict):
        if key not in doc:
            keys = ", ".join(repr(k) for k in list(doc)[:8]) + (", ..." if len(doc) > 8 else "")
            raise ValueError(f"{path}: expected a JSON array of records or an object with a {key!r} array; got "
                             f"an object with keys [{keys}]")
        items, keyed = doc[key], True
        if not isinstance(items, list):
            raise ValueError(f"{path}: {key!r} must be a JSON array of records, got {json_type(items)}")
    elif not isinstance(doc, list):
        want = "a JSON array of records" + (f" or an object with a {key!r} array" if key else "")
        hint = " (one object per line belongs in a .jsonl file)" if isinstance(doc, dict) else ""
        raise ValueError(f"{path}: expected {want}, got {json_type(doc)}{hint}")
    out = []
    for i, v in enumerate(items):
        where = f"{path}: {key}[{i}]" if keyed else f"{path}: record {i}"
        if not isinstance(v, dict):
            raise ValueError(f"{where}: expected a JSON object, got {json_type(v)}")
        out.append(Record(v, i + 1, where))
    return out
