"""Parsing of judge / rubric-generator outputs: known cases, truncation, and a seeded fuzz of
>= 10,000 malformed outputs that must never raise and must each be classified."""
import json
import random
from collections import Counter

import pytest

from arr_jax.judge import parsing as P

CASES = [  # (text, winner, status)
    ('{"rank": [1, 2], "reason": "sharper"}', 1, P.OK),
    ('{"rank": [2, 1], "reason": "x"}', 2, P.OK),
    ('```json\n{"rank": [2, 1], "reason": "x"}\n```', 2, P.REPAIRED),
    ('Sure. Here is my verdict: {"rank": [2, 1], "reason": "ok"} Hope this helps!', 2, P.REPAIRED),
    ('{"rank": [2, 1], "reason": "x",}', 2, P.REPAIRED),                     # trailing comma
    ("{'rank': [1, 2], 'reason': 'single quotes'}", 1, P.REPAIRED),
    ('{rank: [2, 1], reason: "bare keys"}', 2, P.REPAIRED),
    ('{"rank": ["2", "1"]}', 2, P.OK),                                       # numeric strings
    ('{"rank": [1, 2], "reason": "Image 1 keeps the lighting and', 1, P.REPAIRED),  # truncated
    ('{"rank": [1, 1], "reason": "equal"}', 0, P.TIE),
    ('{"rank": [3, 1]}', 0, P.BAD_VALUE),
    ('{"rank": [1, 2, 3]}', 0, P.BAD_VALUE),
    ('{"rank": 2}', 0, P.BAD_VALUE),
    ('{"rank": [true, false]}', 0, P.BAD_VALUE),
    ('{"reason": "no rank"}', 0, P.MISSING_FIELD),
    ("", 0, P.EMPTY),
    ("   \n ", 0, P.EMPTY),
    ("I cannot decide.", 0, P.NO_JSON),
    ("Image 2 is clearly better than the other.", 2, P.FALLBACK),
    ("Image 1 is better. No wait, Image 2 is better.", 0, P.NO_JSON),        # ambiguous prose
    ("{not json at all}", 0, P.INVALID_JSON),
    ("[" * 5000, 0, P.NO_JSON),
    ("{" * 5000, 0, P.INVALID_JSON),
    ('{"rank": [1,', 0, P.BAD_VALUE),
    ("\u201crank\u201d", 0, P.NO_JSON),
]


@pytest.mark.parametrize("text,winner,status", CASES)
def test_pairwise_cases(text, winner, status):
    a = P.parse_pairwise(text)
    assert (a.winner, a.status) == (winner, status), a


def test_other_parsers():
    assert P.parse_pointwise('{"score": 4, "reason": "r"}').score == 4
    assert P.parse_pointwise('{"score": "5"}').score == 5
    assert P.parse_pointwise('{"score": 6}').status == P.BAD_VALUE
    assert P.parse_pointwise('{"score": 2.5}').status == P.BAD_VALUE
    assert (P.parse_pointwise("Score: 3").score, P.parse_pointwise("Score: 3").status) == (3, P.FALLBACK)
    assert P.parse_listwise('{"ranks": [2, 3, 1]}', 3).ranks == [2, 3, 1]
    assert P.parse_listwise('{"ranks": [1, 1, 2]}', 3).status == P.TIE
    assert P.parse_listwise('{"ranks": [1, 2]}', 3).status == P.BAD_VALUE
    assert P.listwise_rewards([2, 3, 1], 3) == pytest.approx([0.45, -0.1, 1.0])
    assert P.listwise_rewards(None, 3) == [0.0, 0.0, 0.0]
    r = P.parse_rubrics('{"rubrics": ["A", {"criterion": "B"}, "a", " ", "1. C"], "reason": "r"}', k=5)
    assert r.rubrics == ["A", "B", "C"] and r.status == P.OK and r.reason == "r"
    assert P.parse_rubrics('{"rubrics": ["A", "B", "C"]}', k=2).rubrics == ["A", "B"]
    assert P.parse_rubrics('{"rubrics": []}').status == P.BAD_VALUE
    t = P.parse_themes('{"themes": [{"name": "Alignment", "tips": ["x", "y", "z"]}, {"name": "D", "tips": ["w"]}]}',
                       max_themes=1, max_tips=2)
    assert t.themes == [("Alignment", ["x", "y"])] and t.status == P.REPAIRED
    t = P.parse_themes("Theme 1: Alignment\n- every object present\nTheme 2: Detail\n- hands have five fingers")
    assert t.themes == [("Alignment", ["every object present"]), ("Detail", ["hands have five fingers"])]
    assert t.status == P.FALLBACK


def test_every_prefix_of_an_answer_is_safe():
    """A truncated answer never yields the wrong winner: it is recovered or undecided."""
    full = json.dumps({"rank": [2, 1], "reason": "Image 2 shows exactly three red circles; image 1 shows two."})
    for i in range(len(full) + 1):
        a = P.parse_pairwise(full[:i])
        assert a.winner in (0, 2), (full[:i], a)
        assert (a.winner == 2) == (a.status in P.USABLE), (full[:i], a)
    assert P.parse_pairwise(full[:20]).winner == 2  # '{"rank": [2, 1], "re' already decides


# ---------------------------------------------------------------------------------------------
# Fuzz

_NOISE = list('{}[]",:\'\\ \n\tabcxyz0123-.#/*`') + ["\u201c", "\u00e9", "\u4e2d", "\ufffd", "\x00", "True", "null"]


def _valid(kind: str, rng) -> str:
    r = lambda: "".join(rng.choices("abcdefgh ijk,.'\"{}", k=rng.randint(0, 40)))  # noqa: E731
    if kind == "pairwise":
        return json.dumps({"rank": [1, 2] if rng.random() < 0.5 else [2, 1], "reason": r()})
    if kind == "pointwise":
        return json.dumps({"score": rng.randint(1, 5), "reason": r()})
    if kind == "listwise":
        return json.dumps({"ranks": rng.sample([1, 2, 3, 4], 4), "reason": r()})
    if kind == "rubrics":
        return json.dumps({"rubrics": [r() or "x" for _ in range(rng.randint(1, 5))], "reason": r()})
    return json.dumps({"themes": [{"name": r() or "t", "tips": [r() or "tip"]} for _ in range(rng.randint(1, 3))]})


def _mutate(s: str, rng) -> str:
    op = rng.randrange(14)
    n = len(s)
    i = rng.randint(0, n)
    if op == 0:
        return s[:i]                                                    # truncate
    if op == 1:
        return s[:i] + s[min(n, i + rng.randint(1, 11)):]         # delete a span
    if op == 2:
        return s[:i] + "".join(rng.choice(_NOISE) for _ in range(rng.randint(1, 5))) + s[i:]
    if op == 3:
        return s.replace('"', "'")
    if op == 4:
        return s.replace("}", ",}").replace("]", ",]")
    if op == 5:
        return f"Let me think.\n```json\n{s}\n```\nSo that is my answer."
    if op == 6:
        return s.replace("[1, 2]", rng.choice(["[0, 2]", "[1, 1]", "[3, 1]", "[\"1\",\"2\"]", "[1.5, 2]", "[null, 1]",
                                                "[[1], 2]", "1", "\"[2, 1]\"", "{}"]))
    if op == 7:
        return s.replace('"rank', '"RANK').replace('"score', '"points').replace('"rubrics', '"items')
    if op == 8:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 79))).decode("latin-1")
    if op == 9:
        return rng.choice(["[", "{", "{\"a\":", "(["]) * rng.randint(10, 2999)
    if op == 10:
        return rng.choice(["", " ", "\n\n", "null", "[]", "42", "\"text\"", "true"])
    if op == 11:
        return s + s[: rng.randint(0, n)]                     # doubled / garbage tail
    if op == 12:
        return s.replace(":", rng.choice([" =", "", "::"]), 1)
    return "".join(c if rng.random() > 0.05 else rng.choice(_NOISE) for c in s)  # sprinkle noise


def _check(kind: str, text: str) -> str:
    a = P.parse_pairwise(text)
    assert a.status in P.STATUSES and a.winner in (0, 1, 2)
    assert (a.winner != 0) == (a.status in P.USABLE), (text, a)
    if kind == "pointwise":
        b = P.parse_pointwise(text)
        assert b.score is None or 1 <= b.score <= 5
        assert (b.score is not None) == (b.status in P.USABLE), (text, b)
        return b.status
    if kind == "listwise":
        b = P.parse_listwise(text, 4)
        assert b.ranks is None or sorted(b.ranks) == [1, 2, 3, 4]
        assert (b.ranks is not None) == (b.status in P.USABLE), (text, b)
        return b.status
    if kind == "rubrics":
        b = P.parse_rubrics(text, 5)
        assert len(b.rubrics) <= 5 and all(isinstance(x, str) and x for x in b.rubrics)
        assert bool(b.rubrics) == (b.status in P.USABLE), (text, b)
        return b.status
    if kind == "themes":
        b = P.parse_themes(text, 3, 2)
        assert len(b.themes) <= 3 and all(n and 1 <= len(t) <= 2 for n, t in b.themes)
        assert bool(b.themes) == (b.status in P.USABLE), (text, b)
        return b.status
    return a.status


def test_fuzz_never_raises_and_classifies_everything():
    rng = random.Random(1234)
    kinds = ("pairwise", "pointwise", "listwise", "rubrics", "themes")
    seen = {k: Counter() for k in kinds}
    n = 0
    for i in range(10_500):
        kind = kinds[i % len(kinds)]
        s = _valid(kind, rng)
        for _ in range(rng.randint(1, 3)):
            s = _mutate(s, rng)
        seen[kind][_check(kind, s)] += 1
        n += 1
    assert n >= 10_000
    total = sum(seen.values(), Counter())
    assert total[P.INTERNAL] == 0, "a parser hit an unexpected exception"
    assert sum(total.values()) == n and set(total) <= set(P.STATUSES)
    # the fuzz reaches every outcome class
    for status in (P.OK, P.REPAIRED, P.TIE, P.EMPTY, P.NO_JSON, P.INVALID_JSON, P.MISSING_FIELD, P.BAD_VALUE):
        assert total[status] > 0, (status, dict(total))
    assert seen["pairwise"][P.FALLBACK] + seen["pointwise"][P.FALLBACK] + seen["themes"][P.FALLBACK] > 0


# ---------------------------------------------------------------------------------------------
# Reasoning-model replies: only the answer region counts, and its LAST JSON object

REASONING_CASES = [  # (text, winner, status)
    ('<think>draft: {"rank": [2, 1]}</think>{"rank": [1, 2]}', 1, P.OK),
    ('draft: {"rank": [2, 1]}</think>{"rank": [1, 2]}', 1, P.OK),            # <think> was in the template
    ("<think>Image 2 looks better so far", 0, P.TRUNCATED_REASONING),          # cut off mid-thought
    ('<think>{"rank": [2, 1]} is my draft', 0, P.TRUNCATED_REASONING),
    ("<think>...</think><answer>Image 1 is better</answer>", 1, P.FALLBACK),
    ('<think>Image 2?</think>\n<answer>{"rank": [1, 2]}</answer>', 1, P.OK),   # the region is exact JSON
    ('<answer>{"rank": [2, 1]}', 2, P.OK),                                    # unclosed answer tag
    ('<answer>I pick {"rank": [2, 1]}', 2, P.REPAIRED),
    ('<think>hmm</think>', 0, P.EMPTY),                                       # reasoning, no answer
    ("<think>a</think>  <answer> </answer>", 0, P.EMPTY),
    ('<think>a <think>b</think> Image 2 wins</think>{"rank": [1, 2]}', 1, P.OK),  # nested
    ('<think>a <think>b</think> {"rank": [1, 2]}', 0, P.TRUNCATED_REASONING),  # the outer one never closes
    ('<THINK>x</Think>{"rank": [2, 1]}', 2, P.OK),
    ('<thinking>{"rank": [1, 2]}</thinking>{"rank": [2, 1]}', 2, P.OK),
    ('{"rank": [2, 1]} on reflection: {"rank": [1, 2]}', 1, P.REPAIRED),       # several objects: the last
    ('My first guess was {"rank": [2, 1]}.\nFinal answer:\n```json\n{"rank": [1, 2], "reason": "r"}\n```', 1,
     P.REPAIRED),
    ('{"rank": [2, 1], "reason": "sharp"} I hope {} helps', 2, P.REPAIRED),   # a later object without the key
    ('{"rank": [1, 2], "meta": {"rank": [2, 1]}}', 1, P.OK),                  # nested objects are not answers
    ("{'rank': [1, 2], 'meta': {\"a\": 1}}", 1, P.REPAIRED),                  # exact inner, repaired outer
    ('{"rank": [2, 1]} then {"rank": [1, 2], "reason": "cut', 2, P.REPAIRED),  # complete beats truncated
    ('{"rank": [Infinity, 1]}', 0, P.BAD_VALUE),
    ('{"rank": [NaN, 1]}', 0, P.BAD_VALUE),
]


@pytest.mark.parametrize("text,winner,status", REASONING_CASES)
def test_reasoning_replies(text, winner, status):
    a = P.parse_pairwise(text)
    assert (a.winner, a.status) == (winner, status), a


def test_answer_region_for_every_parser():
    think = "<think>Draft: {\"score\": 1} {\"ranks\": [3, 2, 1]} {\"rubrics\": [\"draft\"]} Theme 1: Draft\n- d</think>"
    assert P.parse_pointwise(think + '{"score": 4}').score == 4
    assert P.parse_pointwise(think + "<answer>Score: 5</answer>").score == 5
    assert P.parse_pointwise('{"score": NaN}').status == P.BAD_VALUE
    assert P.parse_pointwise('{"score": Infinity}').status == P.BAD_VALUE
    assert P.parse_listwise(think + '{"ranks": [1, 2, 3]}', 3).ranks == [1, 2, 3]
    r = P.parse_rubrics(think + '{"rubrics": ["A", "B"]}')
    assert r.rubrics == ["A", "B"] and r.status == P.OK
    r = P.parse_rubrics('{"rubrics": [{"criterion": "A"}, {"criterion": "B"},]}')   # nested objects + trailing comma
    assert r.rubrics == ["A", "B"] and r.status == P.REPAIRED
    r = P.parse_rubrics('{"rubrics": [{"criterion": "A"}, {"criterion": "B"}, {"crit')  # truncated
    assert r.rubrics == ["A", "B"] and r.status == P.REPAIRED
    t = P.parse_themes(think + "Theme 1: Alignment\n- every object present")
    assert t.themes == [("Alignment", ["every object present"])] and t.status == P.FALLBACK
    for parse in (P.parse_pairwise, P.parse_pointwise, lambda x: P.parse_listwise(x, 3), P.parse_rubrics,
                  P.parse_themes):
        assert parse("<think>Theme 1: A\n- tip\nScore: 4 {\"rank\": [1, 2]}").status == P.TRUNCATED_REASONING
        failed = parse(P.FailedReply("{\"rank\": [1, 2]}", P.TRUNCATED, "request 3: finish_reason 'length'"))
        assert failed.status == P.TRUNCATED        # a failed reply is never read, whatever its text


def _reasoning_reply(rng, final: int) -> tuple[str, int, str]:
    """A reasoning-model-shaped reply whose answer names ``final``: (text, winner, status) with
    the expected outcome. Drafts in the reasoning name the other image."""
    other = 3 - final
    rank = lambda w: json.dumps({"rank": [1, 2] if w == 1 else [2, 1], "reason": "r"})  # noqa: E731
    draft = rng.choice([f"Image {other} is better", rank(other), f"```json\n{rank(other)}\n```",
                        f"Maybe {rank(other)}, or {rank(final)}? Let me look again.", "{", "thinking..."])
    opener = rng.choice(["<think>", "<think>\n", ""])       # "" = the opening tag was in the template
    nested = rng.random() < 0.2
    think = opener + draft + ("<think>inner</think> more" if nested and opener else "")
    if rng.random() < 0.15:                                 # cut off mid-thought
        return (opener or "<think>") + draft, 0, P.TRUNCATED_REASONING
    style = rng.randrange(6)
    if style == 0:
        answer, status = rank(final), P.OK
    elif style == 1:
        answer, status = f"<answer>{rank(final)}</answer>", P.OK
    elif style == 2:
        answer, status = f"Looking closely.\n```json\n{rank(final)}\n```\nDone.", P.REPAIRED
    elif style == 3:
        answer, status = f"First {rank(other)} but on reflection {rank(final)}", P.REPAIRED
    elif style == 4:
        answer, status = f"<answer>Image {final} is better</answer>", P.FALLBACK
    else:
        answer, status = f"{rank(final)[:-12]}", P.REPAIRED  # a truncated answer (the rank survives)
    return f"{think}</think>{rng.choice(['', chr(10), chr(10) * 2])}{answer}", final, status


def test_reasoning_shapes_fuzz():
    """Generated reasoning-model replies give exactly the expected answer; mutated ones never
    raise and are always classified."""
    rng = random.Random(99)
    seen = Counter()
    for i in range(3000):
        text, winner, status = _reasoning_reply(rng, 1 + i % 2)
        a = P.parse_pairwise(text)
        assert (a.winner, a.status) == (winner, status), (text, a)
        seen[a.status] += 1
        mutated = _mutate(text, rng)
        for kind in ("pairwise", "pointwise", "listwise", "rubrics", "themes"):
            assert _check(kind, mutated) in P.STATUSES
    assert {P.OK, P.REPAIRED, P.FALLBACK, P.TRUNCATED_REASONING} <= set(seen), seen
