"""Reading JSON objects out of free text, the way judge models write them (used by
`arr_jax.judge.parsing`, which decides which object is the answer).

`json_objects` lists the top-level objects of a text (prose, code fences and all), left to right:
exact JSON where it parses (`json.JSONDecoder.raw_decode`), else repaired by `_repair`: trailing
commas, single quotes, Python literals (True / False / None), bare keys, ``#`` / ``//``
comments, and a truncated tail (open strings and brackets closed, or cut back to a comma).
Work per text is bounded (a junk reply of thousands of nested ``{`` costs linear time): failed
exact parses may read ``_SCAN_BUDGET`` times the text, failed repairs stop after
``_MAX_REPAIRS``, and nesting deeper than ``_MAX_DEPTH`` is not an answer.
"""
from __future__ import annotations

import json
import re
from typing import Any

MAX_CHARS = 200_000       # longer texts are cut (a runaway generation)
QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})  # curly -> straight
_SCAN_BUDGET = 8          # failed exact parses may read this many times the text's length
_MAX_REPAIRS = 32         # failed repair attempts per text (a '{' each)
_MAX_DEPTH = 64           # deeper nesting is not a judge answer


def _repair(s: str, i: int = 0) -> tuple[str, list[str], int | None]:
    """Normalise the JSON-ish object text starting at ``s[i] == '{'``. Returns (text, trims,
    end): ``trims`` are the text cut at each of the last commas, with the brackets open there
    closed (to drop a broken tail); ``end`` is the index just past the object's closing brace,
    or None when the text ends first (a truncated object, closed here)."""
    out: list[str] = []
    stack: list[str] = []
    cuts: list[tuple[int, list[str]]] = []
    n = len(s)
    in_str: str | None = None
    while i < n:
        c = s[i]
        if in_str is not None:
            if c == "\\" and i + 1 < n:
                nxt = s[i + 1]
                if in_str == "'" and nxt == "'":
                    out.append("'")
                else:
                    out.append(c + nxt)
                i += 2
                continue
            if c == in_str:
                out.append('"')
                in_str = None
            elif c == '"':  # a double quote inside a single-quoted string
                out.append('\\"')
            elif c == "\n":
                out.append("\\n")
            elif c in "\r\t":
                out.append("\\r" if c == "\r" else "\\t")
            else:
                out.append(c)
            i += 1
            continue
        if c in "\"'":
            in_str = c
            out.append('"')
        elif c in "{[":
            if len(stack) >= _MAX_DEPTH:
                raise ValueError("nesting too deep")
            stack.append("}" if c == "{" else "]")
            out.append(c)
        elif c in "}]":
            # drop a trailing comma before a closer
            j = len(out) - 1
            while j >= 0 and out[j].isspace():
                j -= 1
            if j >= 0 and out[j] == ",":
                del out[j]
                if cuts and cuts[-1][0] == j:
                    cuts.pop()
            if stack and stack[-1] == c:
                stack.pop()
                out.append(c)
                if not stack:
                    return "".join(out), _trims(out, cuts), i + 1
            else:
                raise ValueError("mismatched bracket")
        elif c == ",":
            cuts.append((len(out), list(stack)))
            out.append(c)
        elif c.isalpha() or c == "_":
            j = i
            while j < n and (s[j].isalnum() or s[j] == "_"):
                j += 1
            word = s[i:j]
            k = j
            while k < n and s[k] in " \t":
                k += 1
            if k < n and s[k] == ":" and stack and stack[-1] == "}":
                out.append(json.dumps(word))          # bare key
            elif word in ("True", "False", "None"):
                out.append({"True": "true", "False": "false", "None": "null"}[word])
            else:
                out.append(word)
            i = j
            continue
        elif c == "#" or (c == "/" and i + 1 < n and s[i + 1] == "/"):
            while i < n and s[i] != "\n":  # comment to end of line
                i += 1
            continue
        else:
            out.append(c)
        i += 1
    # truncated: close the open string and brackets
    if in_str is not None:
        out.append('"')
    text = "".join(out).rstrip()
    while text.endswith((",", ":")):
        text = text[:-1].rstrip()
        if text.endswith(":"):
            text += " null"
            break
    return text + "".join(reversed(stack)), _trims(out, cuts), None


def _trims(out: list[str], cuts: list[tuple[int, list[str]]]) -> list[str]:
    return ["".join(out[:i]) + "".join(reversed(st)) for i, st in reversed(cuts[-32:])]


def loads(s: str) -> Any:
    """``json.loads``, or None when the text is not JSON."""
    try:
        return json.loads(s)
    except (ValueError, RecursionError):
        return None


def _repaired_object(s: str, start: int) -> tuple[dict | None, int | None]:
    """The object starting at ``s[start] == '{'`` after repairs: (obj, end) with ``end`` None
    for a truncated object running to the end of ``s``; (None, None) if it cannot be read."""
    try:
        fixed, trims, end = _repair(s, start)
    except (ValueError, RecursionError):
        return None, None
    obj = loads(fixed)
    if not isinstance(obj, dict):
        obj = next((o for o in map(loads, trims) if isinstance(o, dict)), None)  # drop a broken tail
    return obj, end


_EXACT_START = re.compile(r'\{\s*["}]')   # how an exact JSON object starts


def json_objects(region: str) -> tuple[list[dict], dict | None, bool]:
    """The top-level JSON objects of ``region``, left to right, each exact or repaired:
    ``(complete objects, truncated, saw_brace)``; ``truncated`` is a (repaired) object that
    runs to the end of the text, else None. Objects nested in another are not listed."""
    text = region[:MAX_CHARS].translate(QUOTES)
    found: list[dict] = []
    truncated, saw, pos, failed = None, False, 0, 0
    budget = _SCAN_BUDGET * len(text) + 4096  # characters read by failed exact parses
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        st = m.start()
        saw = True
        if st < pos:
            continue  # inside an object already read
        if budget <= 0:
            break  # a junk reply (say, thousands of nested '{'): bounds the time, answers lie earlier
        obj = None
        if _EXACT_START.match(text, st):
            try:
                obj, end = decoder.raw_decode(text, st)
            except json.JSONDecodeError as e:
                budget -= e.pos - st + 1
            except (ValueError, RecursionError):
                budget -= len(text) - st
        if isinstance(obj, dict):
            found.append(obj)
            pos = end
            continue
        if failed >= _MAX_REPAIRS:
            continue
        obj, end = _repaired_object(text, st)
        if obj is None:
            failed += 1
        elif end is None:
            truncated = obj
            break  # every later '{' lies inside it
        else:
            found.append(obj)
            pos = end
    return found, truncated, saw
