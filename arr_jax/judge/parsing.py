"""Parsing of judge / rubric-generator outputs that never raises.

Every parser first isolates the *answer region* of a reply (`answer_region`), then reads the
LAST complete JSON object of that region that holds the parser's key (`extract_json`), falling
back to answer patterns in the region's prose. The answer region:

  * a backend's `FailedReply` (a reply that is no answer: cut off, refused, reasoning only, an
    input that could not be processed) has none: the parser returns the reply's own status;
  * reasoning is dropped: the region starts after the last ``</think>`` that closes every open
    ``<think>`` (the opening tag may be absent: thinking models' chat templates emit it);
    a ``<think>`` block that never closes is a reply cut off mid-thought: status
    ``truncated_reasoning``, whatever the draft says;
  * inside the region, ``<answer>...</answer>`` (the last such block; an unclosed one runs to
    the end) is the region when present.

Every parser returns a result with a ``status`` from ``STATUSES``:

  ok            well-formed JSON with valid fields
  repaired      valid fields after repairs: code fences, prose around the JSON, trailing commas,
                single quotes, Python literals, bare keys, a truncated tail
  fallback      no usable JSON, but an unambiguous answer pattern in the prose
  tie           a pairwise answer ranking both images the same (listwise: repeated ranks);
                the defined outcome is "undecided"
  empty         empty / whitespace-only output (or answer region)
  no_json       no JSON object and no answer pattern
  invalid_json  a JSON-looking span that could not be repaired
  missing_field JSON without the required key
  bad_value     the key is there but its value is unusable (wrong type, out of range, NaN,
                ranks not a permutation, no non-empty rubric, ...)
  truncated_reasoning  a ``<think>`` block that never closes: the reply was cut off mid-thought
  internal_error  a bug in this module (caught; tests assert it never happens)

and, carried by a backend's `FailedReply` (see `REPLY_FAILURES`, `INPUT_FAILURES`) or set by a
judge (`NON_FINITE`):

  truncated     the server stopped before the answer was complete (``finish_reason`` "length", ...)
  refused       the server refused (a ``refusal`` field, ``finish_reason`` "content_filter")
  reasoning_only  reasoning text but no answer content
  bad_image     an image of the request could not be decoded or used (e.g. its aspect ratio)
  too_long      the request does not fit the model's context
  input_error   another problem with this one request
  rejected      the server rejected this one request (HTTP 400 / 413 / 422)
  non_finite    a judge score that is NaN or infinite (counted, replaced by p = 0.5)
  thinking      a one-token choice reply that opens a reasoning block instead of answering
  no_choice     a one-token choice reply whose top log-probs hold neither option token

``FAILURES`` are the statuses whose answer is not used (a tie is a defined outcome, not a
parse failure, but is counted too). ``Counter``s of statuses are what judges report.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from typing import Any, Callable, Iterable

from arr_jax.judge.json_repair import MAX_CHARS, QUOTES, json_objects, loads

OK, REPAIRED, FALLBACK, TIE = "ok", "repaired", "fallback", "tie"
EMPTY, NO_JSON, INVALID_JSON, MISSING_FIELD, BAD_VALUE, INTERNAL = (
    "empty", "no_json", "invalid_json", "missing_field", "bad_value", "internal_error")
TRUNCATED_REASONING = "truncated_reasoning"
TRUNCATED, REFUSED, REASONING_ONLY = "truncated", "refused", "reasoning_only"
BAD_IMAGE, TOO_LONG, INPUT_ERROR, REJECTED = "bad_image", "too_long", "input_error", "rejected"
NON_FINITE = "non_finite"
# a choice-scored reply (one token, its log-probs) that starts a reasoning block / holds neither option
THINKING, NO_CHOICE = "thinking", "no_choice"
REPLY_FAILURES = (TRUNCATED, REFUSED, REASONING_ONLY, THINKING, NO_CHOICE)  # the reply is no answer
INPUT_FAILURES = (BAD_IMAGE, TOO_LONG, INPUT_ERROR, REJECTED)  # the request could not be answered
STATUSES = (OK, REPAIRED, FALLBACK, TIE, EMPTY, NO_JSON, INVALID_JSON, MISSING_FIELD, BAD_VALUE,
            TRUNCATED_REASONING, INTERNAL) + REPLY_FAILURES + INPUT_FAILURES + (NON_FINITE,)
# failures of the run rather than of the answer's format: what a long run's failure cap counts
# where parse failures are the measurement (judge evaluation, rubric induction)
RUN_ERRORS = INPUT_FAILURES + REPLY_FAILURES + (TRUNCATED_REASONING, NON_FINITE, INTERNAL)
USABLE = (OK, REPAIRED, FALLBACK)
FAILURES = (EMPTY, NO_JSON, INVALID_JSON, MISSING_FIELD, BAD_VALUE, TRUNCATED_REASONING,
            INTERNAL) + REPLY_FAILURES + INPUT_FAILURES + (NON_FINITE,)

_MAX_CHARS = MAX_CHARS


def count(statuses) -> dict[str, int]:
    """Counts of statuses (every kind that occurred)."""
    return dict(Counter(statuses))


class FailedReply(str):
    """A backend's reply that is not an answer: ``str(reply)`` is whatever text came back (maybe
    empty, maybe reasoning), ``status`` one of `REPLY_FAILURES` / `INPUT_FAILURES` (or any
    failure status), ``reason`` a message naming the request. Every parser returns ``status``
    for it without reading the text; API backends never cache it."""

    status: str
    reason: str

    def __new__(cls, text: str = "", status: str = INPUT_ERROR, reason: str = ""):
        obj = super().__new__(cls, text or "")
        obj.status, obj.reason = status, reason
        return obj

    def __repr__(self) -> str:
        return f"FailedReply({str.__repr__(self)}, status={self.status!r}, reason={self.reason!r})"


# --------------------------------------------------------------------------------------------
# The answer region

_THINK_TAG = re.compile(r"<\s*(/?)\s*think(?:ing)?\s*>", re.I)
_ANSWER_OPEN = re.compile(r"<\s*answer\s*>", re.I)
_ANSWER_CLOSE = re.compile(r"<\s*/\s*answer\s*>", re.I)


def answer_region(text: Any) -> tuple[str, str | None]:
    """``(region, status)``: the part of a reply that holds the answer (module docstring), and
    None, or the status that ends parsing: the `FailedReply`'s own, `TRUNCATED_REASONING`
    (an unclosed think block) or `EMPTY` (nothing left). Never raises."""
    if isinstance(text, FailedReply):
        return "", text.status
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    text = text[:_MAX_CHARS]
    depth, start = 0, 0
    for m in _THINK_TAG.finditer(text):
        if m.group(1):                       # </think>; with no open block its <think> was in the template
            depth = max(depth - 1, 0)
            if depth == 0:
                start = m.end()
        else:
            depth += 1
    if depth:
        return text[start:], TRUNCATED_REASONING
    region = text[start:]
    opens = list(_ANSWER_OPEN.finditer(region))
    if opens:
        region = region[opens[-1].end():]
        close = _ANSWER_CLOSE.search(region)
        region = region[:close.start()] if close else region
    else:
        closes = list(_ANSWER_CLOSE.finditer(region))
        if closes:
            region = region[:closes[-1].start()]
    return region, (None if region.strip() else EMPTY)


def _stop_reason(text: Any, status: str) -> str:
    if isinstance(text, FailedReply):
        return text.reason
    if status == TRUNCATED_REASONING:
        return f"reasoning cut off before any answer ({len(str(text))} characters)"
    return ""


# --------------------------------------------------------------------------------------------
# The answer object

def _extract(region: str, keys: Iterable[str] = ()) -> tuple[dict | None, str]:
    """The answer object of an answer region: the last complete object holding one of ``keys``,
    else a truncated one holding one, else the last complete one, else the truncated one."""
    if not region.strip():
        return None, EMPTY
    stripped = region.strip().translate(QUOTES)
    direct = loads(stripped) if stripped.startswith("{") else None
    if isinstance(direct, dict):
        return direct, OK
    found, truncated, saw = json_objects(region)
    keys = tuple(keys)
    has = lambda o: o is not None and any(k in o for k in keys)  # noqa: E731
    pick = next((o for o in reversed(found) if has(o)), None)
    if pick is None:
        pick = truncated if has(truncated) else (found[-1] if found else truncated)
    if pick is not None:
        return pick, REPAIRED
    return None, INVALID_JSON if saw else NO_JSON


def extract_json(text: Any, keys: Iterable[str] = ()) -> tuple[dict | None, str]:
    """The answer object of a reply: the last complete JSON object of its answer region (the
    last one holding one of ``keys`` when given; module docstring), repaired if needed.

    Returns (obj, status) with status OK (the region is exactly one JSON object) / REPAIRED, or
    (None, EMPTY / NO_JSON / INVALID_JSON / TRUNCATED_REASONING / a FailedReply's status).
    """
    region, stop = answer_region(text)
    if stop is not None:
        return None, stop
    return _extract(region, keys)


# --------------------------------------------------------------------------------------------
# Typed answers

def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(?:image\s*)?#?\s*(-?\d{1,6})(?:\.0+)?\s*", v, re.I)
        if m:
            return int(m.group(1))
    return None


def _reason(obj: dict) -> str:
    r = obj.get("reason", obj.get("rationale", obj.get("explanation", "")))
    return r[:4000] if isinstance(r, str) else json.dumps(r)[:4000] if r is not None else ""


def _guard(fn: Callable, make_failure: Callable[[str], Any]) -> Callable:
    def wrapped(*args, **kw):
        try:
            return fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - the contract is "never raises"
            return make_failure(f"{type(e).__name__}: {e}")
    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


@dataclasses.dataclass
class PairwiseAnswer:
    """winner: 1 / 2, or 0 when undecided (tie or failure)."""

    winner: int
    status: str
    reason: str = ""

    @property
    def usable(self) -> bool:
        return self.status in USABLE


_RANK_RE = re.compile(r"""["']?rank(?:s|ing)?["']?\s*[:=]\s*\[\s*["']?(\d+)["']?\s*,\s*["']?(\d+)""", re.I)
_BETTER_RE = re.compile(
    r"\bimage\s*([12])\b[^.\n]{0,40}?\b(?:is|was|looks|seems)\s+(?:clearly\s+|slightly\s+)?"
    r"(?:better|superior|preferred|preferable|the\s+winner)\b|\b(?:prefer|choose|pick|winner\s*(?:is|:))\s*"
    r"(?:the\s+)?image\s*([12])\b", re.I)


def _pair_from_ranks(r: Any) -> tuple[int, str]:
    if isinstance(r, str):
        inner = loads(r) if r.strip().startswith("[") else None
        r = inner if isinstance(inner, list) else r
    if not isinstance(r, list) or len(r) != 2:  # {"rank": 2} is ambiguous: refuse it
        return (0, BAD_VALUE)
    a, b = _as_int(r[0]), _as_int(r[1])
    if a not in (1, 2) or b not in (1, 2):
        return (0, BAD_VALUE)
    if a == b:
        return (0, TIE)
    return (1 if a == 1 else 2, OK)


_PAIR_KEYS = ("rank", "ranks", "ranking", "winner", "better", "preferred", "choice")


def _parse_pairwise(text: Any) -> PairwiseAnswer:
    region, stop = answer_region(text)
    if stop is not None:
        return PairwiseAnswer(0, stop, _stop_reason(text, stop))
    obj, how = _extract(region, _PAIR_KEYS)
    if obj is not None:
        key = next((k for k in ("rank", "ranks", "ranking") if k in obj), None)
        if key is not None:
            w, st = _pair_from_ranks(obj[key])
            return PairwiseAnswer(w, how if st == OK else st, _reason(obj))
        for k in ("winner", "better", "preferred", "choice"):
            if k in obj:
                v = obj[k]
                w = _as_int(v)
                if w in (1, 2):
                    return PairwiseAnswer(w, REPAIRED, _reason(obj))
                if isinstance(v, str) and re.fullmatch(r"\s*(tie|equal|both|none|neither)\s*", v, re.I):
                    return PairwiseAnswer(0, TIE, _reason(obj))
                return PairwiseAnswer(0, BAD_VALUE, _reason(obj))
        if how != OK:  # a JSON fragment without the key: maybe the prose says it
            fb = _pairwise_fallback(region)
            if fb is not None:
                return fb
        return PairwiseAnswer(0, MISSING_FIELD, _reason(obj))
    if how == EMPTY:
        return PairwiseAnswer(0, EMPTY)
    fb = _pairwise_fallback(region)
    return fb if fb is not None else PairwiseAnswer(0, how)


def _pairwise_fallback(text: str) -> PairwiseAnswer | None:
    """An unambiguous answer pattern in the prose of an answer region, or None."""
    m = _RANK_RE.search(text)
    if m:
        w, st = _pair_from_ranks([int(m.group(1)), int(m.group(2))])
        return PairwiseAnswer(w, FALLBACK if st == OK else st, text[:500])
    picks = {int(a or b) for a, b in _BETTER_RE.findall(text)}
    if len(picks) == 1:
        return PairwiseAnswer(picks.pop(), FALLBACK, text[:500])
    return None


parse_pairwise = _guard(_parse_pairwise, lambda e: PairwiseAnswer(0, INTERNAL, e))
parse_pairwise.__doc__ = """``{"rank": [r1, r2], "reason": ...}`` -> PairwiseAnswer (winner 0 unless usable).
Reads the reply's answer region (reasoning dropped), its last JSON object with a rank key."""


@dataclasses.dataclass
class PointwiseAnswer:
    """score: integer 1..5, or None when unusable."""

    score: int | None
    status: str
    reason: str = ""


_SCORE_RE = re.compile(r"\b(?:score|rating)\s*[\"']?\s*[:=]\s*[\"']?\s*([1-5])(?:\.0+)?\b|\b([1-5])\s*/\s*5\b", re.I)


def _parse_pointwise(text: Any, lo: int = 1, hi: int = 5) -> PointwiseAnswer:
    region, stop = answer_region(text)
    if stop is not None:
        return PointwiseAnswer(None, stop, _stop_reason(text, stop))
    obj, how = _extract(region, ("score", "rating"))
    if obj is not None:
        key = next((k for k in ("score", "rating") if k in obj), None)
        if key is None:
            return PointwiseAnswer(None, MISSING_FIELD, _reason(obj))
        s = _as_int(obj[key])
        if s is None or not lo <= s <= hi:
            return PointwiseAnswer(None, BAD_VALUE, _reason(obj))
        return PointwiseAnswer(s, how, _reason(obj))
    if how == EMPTY:
        return PointwiseAnswer(None, EMPTY)
    found = {int(a or b) for a, b in _SCORE_RE.findall(region)}
    if len(found) == 1:
        return PointwiseAnswer(found.pop(), FALLBACK)
    return PointwiseAnswer(None, how)


parse_pointwise = _guard(_parse_pointwise, lambda e: PointwiseAnswer(None, INTERNAL, e))
parse_pointwise.__doc__ = """``{"score": 1-5, "reason": ...}`` -> PointwiseAnswer."""


@dataclasses.dataclass
class ListwiseAnswer:
    """ranks: ranks[i] is the rank (1 = best) of image i+1, a permutation of 1..N; or None."""

    ranks: list[int] | None
    status: str
    reason: str = ""


def _parse_listwise(text: Any, n: int) -> ListwiseAnswer:
    region, stop = answer_region(text)
    if stop is not None:
        return ListwiseAnswer(None, stop, _stop_reason(text, stop))
    obj, how = _extract(region, ("ranks", "rank", "ranking"))
    if obj is None:
        return ListwiseAnswer(None, how)
    key = next((k for k in ("ranks", "rank", "ranking") if k in obj), None)
    if key is None:
        return ListwiseAnswer(None, MISSING_FIELD, _reason(obj))
    r = obj[key]
    if not isinstance(r, list) or len(r) != n:
        return ListwiseAnswer(None, BAD_VALUE, _reason(obj))
    ranks = [_as_int(x) for x in r]
    if any(x is None or not 1 <= x <= n for x in ranks):
        return ListwiseAnswer(None, BAD_VALUE, _reason(obj))
    if len(set(ranks)) != n:
        return ListwiseAnswer(None, TIE, _reason(obj))
    return ListwiseAnswer(ranks, how, _reason(obj))


parse_listwise = _guard(_parse_listwise, lambda e: ListwiseAnswer(None, INTERNAL, e))
parse_listwise.__doc__ = """``{"ranks": [...N ranks...]}`` -> ListwiseAnswer (a permutation of 1..N)."""


def listwise_rewards(ranks: list[int] | None, n: int) -> list[float]:
    """Reward of each image from its rank k: ``1 - 1.1 (k-1)/(N-1)`` (SPEC §1.5); all 0 when
    the answer is unusable (no signal)."""
    if ranks is None or n < 2:
        return [0.0] * n
    return [1.0 - 1.1 * (k - 1) / (n - 1) for k in ranks]


@dataclasses.dataclass
class RubricsAnswer:
    rubrics: list[str]
    status: str
    reason: str = ""


def _rubric_text(item: Any) -> str:
    if isinstance(item, str):
        return item.strip()
    if isinstance(item, dict):
        for k in ("criterion", "rubric", "text", "description", "check", "question"):
            if isinstance(item.get(k), str) and item[k].strip():
                name = item.get("name")
                t = item[k].strip()
                return f"{name.strip()}: {t}" if isinstance(name, str) and name.strip() and k == "description" else t
        if isinstance(item.get("name"), str):
            return item["name"].strip()
    return ""


def _parse_rubrics(text: Any, k: int | None = None) -> RubricsAnswer:
    region, stop = answer_region(text)
    if stop is not None:
        return RubricsAnswer([], stop, _stop_reason(text, stop))
    obj, how = _extract(region, ("rubrics", "criteria", "rubric"))
    if obj is None:
        return RubricsAnswer([], how)
    key = next((x for x in ("rubrics", "criteria", "rubric") if x in obj), None)
    if key is None:
        return RubricsAnswer([], MISSING_FIELD, _reason(obj))
    items = obj[key]
    if isinstance(items, str):
        items = [ln for ln in re.split(r"\n+", items)]
    if not isinstance(items, list):
        return RubricsAnswer([], BAD_VALUE, _reason(obj))
    seen, out = set(), []
    for it in items:
        t = re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s*", "", _rubric_text(it))[:1000]
        if t and t.lower() not in seen:
            seen.add(t.lower())
            out.append(t)
    if not out:
        return RubricsAnswer([], BAD_VALUE, _reason(obj))
    status = how
    if k is not None and len(out) > k:
        out, status = out[:k], REPAIRED
    return RubricsAnswer(out, status, _reason(obj))


parse_rubrics = _guard(_parse_rubrics, lambda e: RubricsAnswer([], INTERNAL, e))
parse_rubrics.__doc__ = """``{"rubrics": [...], "reason": ...}`` -> RubricsAnswer (at most k, deduplicated)."""


@dataclasses.dataclass
class ThemesAnswer:
    """themes: [(name, [tips])] in order."""

    themes: list[tuple[str, list[str]]]
    status: str


_THEME_LINE = re.compile(r"^\s*(?:#+\s*)?(?:\*\*)?\s*theme\s*(\d+)?\s*[:.)-]\s*(.+?)(?:\*\*)?\s*$", re.I)
_TIP_LINE = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|tip\s*\d*\s*[:.)-])\s*(.+?)\s*$", re.I)


def parse_themes_text(text: str) -> list[tuple[str, list[str]]]:
    """Plain-text Theme + Tips ("Theme 1: name" lines, "- tip" lines) -> [(name, tips)]."""
    themes: list[tuple[str, list[str]]] = []
    for line in str(text).splitlines():
        m = _THEME_LINE.match(line)
        if m:
            themes.append((m.group(2).strip().strip("*").strip(), []))
            continue
        t = _TIP_LINE.match(line)
        if t and themes and t.group(1).strip():
            themes[-1][1].append(t.group(1).strip())
    return [(n, tips) for n, tips in themes if n and tips]


def _parse_themes(text: Any, max_themes: int | None = None, max_tips: int | None = None) -> ThemesAnswer:
    region, stop = answer_region(text)
    if stop is not None:
        return ThemesAnswer([], stop)
    obj, how = _extract(region, ("themes",))
    themes: list[tuple[str, list[str]]] = []
    status = how
    if obj is not None:
        raw = obj.get("themes")
        if raw is None:
            status = MISSING_FIELD
        elif not isinstance(raw, list):
            status = BAD_VALUE
        else:
            for th in raw:
                if not isinstance(th, dict):
                    continue
                name = th.get("name", th.get("theme", ""))
                tips = th.get("tips", th.get("items", []))
                if isinstance(tips, str):
                    tips = [tips]
                tips = [t.strip() for t in tips if isinstance(t, str) and t.strip()] if isinstance(tips, list) else []
                if isinstance(name, str) and name.strip() and tips:
                    themes.append((name.strip(), tips))
            if not themes:
                status = BAD_VALUE
    if not themes and status != EMPTY:
        themes = parse_themes_text(region)
        if themes:
            status = FALLBACK
    if not themes:
        return ThemesAnswer([], status if status not in USABLE else BAD_VALUE)
    if max_themes is not None and len(themes) > max_themes:
        themes, status = themes[:max_themes], (REPAIRED if status == OK else status)
    if max_tips is not None and any(len(t) > max_tips for _, t in themes):
        themes = [(n, t[:max_tips]) for n, t in themes]
        status = REPAIRED if status == OK else status
    return ThemesAnswer(themes, status)


parse_themes = _guard(_parse_themes, lambda e: ThemesAnswer([], INTERNAL))
parse_themes.__doc__ = """``{"themes": [{"name", "tips"}]}`` (or plain Theme/Tips text) -> ThemesAnswer."""
