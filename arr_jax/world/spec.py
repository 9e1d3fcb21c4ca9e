"""Grammar of the synthetic world: scenes, captions, parser, train/held-out split, tokenizer.

A scene is 1-3 identical objects of one colour and one shape, all inside one half of the
canvas. A caption reads "<count> <colour> <shape> on the <position>", e.g.
"two red circles on the left". Any attribute may be omitted ("two circles on the left",
"red objects"); the parser returns ``None`` for an omitted attribute.

Attribute values are stored as ints (index into the value tuples below); ``count`` is
stored as the count itself (1..3).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Mapping, Sequence

import numpy as np

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNTS: tuple[int, ...] = (1, 2, 3)
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "count", "position")

COUNT_WORDS: tuple[str, ...] = ("one", "two", "three")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
_GENERIC = ("object", "objects")

# Word-level vocabulary. Id 0 is padding; there is no <unk>: unknown words are an error.
VOCAB: tuple[str, ...] = (
    ("<pad>",) + COUNT_WORDS + COLOURS
    + tuple(w for s in SHAPES for w in (s, PLURALS[s])) + _GENERIC
    + ("on", "the") + POSITIONS
)
PAD_ID = 0
WORD_TO_ID: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}

_VALUES = {"colour": COLOURS, "shape": SHAPES, "count": COUNTS, "position": POSITIONS}


def values_of(attr: str) -> tuple:
    """The possible values of attribute ``attr``."""
    return _VALUES[attr]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A (possibly partial) scene description; ``None`` means the attribute is unspecified.

    colour / shape / position are strings from COLOURS / SHAPES / POSITIONS, count is an int.
    A complete Prompt is a Scene.
    """

    colour: str | None = None
    shape: str | None = None
    count: int | None = None
    position: str | None = None

    def __post_init__(self):
        for attr in ATTRIBUTES:
            v = getattr(self, attr)
            if v is not None and v not in _VALUES[attr]:
                raise ValueError(f"invalid {attr} {v!r}; expected one of {_VALUES[attr]}")

    @property
    def is_complete(self) -> bool:
        return all(getattr(self, a) is not None for a in ATTRIBUTES)

    @property
    def text(self) -> str:
        """Caption text, e.g. "two red circles on the left"."""
        words = []
        if self.count is not None:
            words.append(COUNT_WORDS[self.count - 1])
        if self.colour is not None:
            words.append(self.colour)
        plural = self.count != 1  # an unspecified count uses the (uninformative) plural
        if self.shape is not None:
            words.append(PLURALS[self.shape] if plural else self.shape)
        else:
            words.append(_GENERIC[1] if plural else _GENERIC[0])
        if self.position is not None:
            words += ["on", "the", self.position]
        return " ".join(words)

    def to_ints(self) -> np.ndarray:
        """(4,) int32: colour, shape, count, position indices; -1 where unspecified.

        Count is stored as the count itself (1..3)."""
        out = []
        for a in ATTRIBUTES:
            v = getattr(self, a)
            if v is None:
                out.append(-1)
            elif a == "count":
                out.append(int(v))
            else:
                out.append(_VALUES[a].index(v))
        return np.asarray(out, np.int32)

    @classmethod
    def from_ints(cls, ints: Sequence[int]) -> "Prompt":
        """Inverse of ``to_ints`` (-1 -> None)."""
        kw = {}
        for a, v in zip(ATTRIBUTES, ints):
            v = int(v)
            if v < 0:
                kw[a] = None
            elif a == "count":
                kw[a] = v
            else:
                kw[a] = _VALUES[a][v]
        return cls(**kw)

    def replace(self, **kw) -> "Prompt":
        return dataclasses.replace(self, **kw)

    def __str__(self) -> str:
        return self.text


Scene = Prompt  # a complete Prompt


def parse_prompt(text: str) -> Prompt:
    """Parse a caption of the world grammar. Raises ValueError naming the bad text.

    Grammar: [count] [colour] (shape|shapes|object|objects) [on the position].
    """
    if not isinstance(text, str):
        if isinstance(text, (bytes, np.bytes_)):
            text = bytes(text).decode("utf-8")
        else:
            raise ValueError(f"prompt must be a string, got {type(text).__name__}: {text!r}")
    words = text.strip().lower().rstrip(".").split()

    def bad(why: str) -> ValueError:
        return ValueError(f"cannot parse world prompt {text!r}: {why}")

    i, kw = 0, {}
    if i < len(words) and words[i] in COUNT_WORDS:
        kw["count"] = COUNT_WORDS.index(words[i]) + 1
        i += 1
    if i < len(words) and words[i] in COLOURS:
        kw["colour"] = words[i]
        i += 1
    if i >= len(words):
        raise bad("missing shape noun")
    noun = words[i]
    i += 1
    singular = None
    if noun in SHAPES:
        kw["shape"], singular = noun, True
    elif noun in PLURALS.values():
        kw["shape"], singular = noun[:-1], False
    elif noun in _GENERIC:
        singular = noun == _GENERIC[0]
    else:
        raise bad(f"unknown word {noun!r} where a shape was expected")
    if "count" in kw and singular != (kw["count"] == 1):
        raise bad(f"number of {noun!r} does not agree with the count")
    if i < len(words):
        rest = words[i:]
        if len(rest) != 3 or rest[0] != "on" or rest[1] != "the" or rest[2] not in POSITIONS:
            raise bad(f"expected 'on the <{'|'.join(POSITIONS)}>', got {' '.join(rest)!r}")
        kw["position"] = rest[2]
    return Prompt(**kw)


# ---------------------------------------------------------------------------------------
# Prompt combinations and the fixed train / held-out split.

ALL_PROMPTS: tuple[Prompt, ...] = tuple(
    Prompt(colour=c, shape=s, count=n, position=p)
    for c, s, n, p in itertools.product(COLOURS, SHAPES, COUNTS, POSITIONS)
)  # 144, in a fixed order; ``prompt_id`` indexes this tuple
_PROMPT_INDEX = {p: i for i, p in enumerate(ALL_PROMPTS)}


def prompt_id(p: Prompt) -> int:
    """Index of a complete prompt in ALL_PROMPTS."""
    return _PROMPT_INDEX[p]


def _split(seed: int = 20260501, heldout_fraction: float = 0.25) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Greedy seeded split: hold out a prompt only if every value pair it uses (across
    attribute kinds) keeps at least one training prompt."""
    n_held = int(round(heldout_fraction * len(ALL_PROMPTS)))
    pair_counts: dict[tuple, int] = {}

    def pairs(p: Prompt):
        vals = [(a, getattr(p, a)) for a in ATTRIBUTES]
        return list(itertools.combinations(vals, 2))

    for p in ALL_PROMPTS:
        for pr in pairs(p):
            pair_counts[pr] = pair_counts.get(pr, 0) + 1
    held = []
    for idx in np.random.default_rng(seed).permutation(len(ALL_PROMPTS)):
        if len(held) == n_held:
            break
        prs = pairs(ALL_PROMPTS[idx])
        if all(pair_counts[pr] > 1 for pr in prs):
            for pr in prs:
                pair_counts[pr] -= 1
            held.append(int(idx))
    held_set = set(held)
    train = tuple(i for i in range(len(ALL_PROMPTS)) if i not in held_set)
    return train, tuple(sorted(held))


TRAIN_IDS, HELDOUT_IDS = _split()
TRAIN_PROMPTS: tuple[Prompt, ...] = tuple(ALL_PROMPTS[i] for i in TRAIN_IDS)
HELDOUT_PROMPTS: tuple[Prompt, ...] = tuple(ALL_PROMPTS[i] for i in HELDOUT_IDS)


# ---------------------------------------------------------------------------------------
# Tokenizer.

def tokenize(texts: Sequence[str] | str, max_len: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Word-level tokens of world captions.

    Returns (ids, mask): ids int32 (B, max_len) padded with PAD_ID=0, mask bool (B, max_len).
    Raises ValueError on an unknown word or a caption longer than max_len.
    """
    if isinstance(texts, (str, bytes)):
        texts = [texts]
    ids = np.zeros((len(texts), max_len), np.int32)
    for b, t in enumerate(texts):
        if isinstance(t, (bytes, np.bytes_)):
            t = bytes(t).decode("utf-8")
        words = t.strip().lower().rstrip(".").split()
        if len(words) > max_len:
            raise ValueError(f"caption {t!r} has {len(words)} words > max_len={max_len}")
        for j, w in enumerate(words):
            if w not in WORD_TO_ID:
                raise ValueError(f"unknown word {w!r} in caption {t!r}")
            ids[b, j] = WORD_TO_ID[w]
    return ids, ids != PAD_ID


def detokenize(ids: np.ndarray) -> list[str]:
    """(B, L) int ids -> captions (padding dropped)."""
    return [" ".join(VOCAB[i] for i in row if i != PAD_ID) for row in np.asarray(ids)]


# ---------------------------------------------------------------------------------------
# Caption corruption (for pretraining the base policy with imperfect binding).

def corrupt_prompt(
    prompt: Prompt,
    rng: np.random.Generator,
    p_wrong: Mapping[str, float] | float = 0.0,
    p_drop: Mapping[str, float] | float = 0.0,
) -> Prompt:
    """Per attribute independently: replace by a uniformly drawn wrong value with prob
    p_wrong[attr], or omit with prob p_drop[attr] (disjoint events, so p_wrong + p_drop
    <= 1); floats apply to every attribute, missing dict keys mean 0."""
    kw = {}
    for a in ATTRIBUTES:
        pw = p_wrong if isinstance(p_wrong, (int, float)) else p_wrong.get(a, 0.0)
        pd = p_drop if isinstance(p_drop, (int, float)) else p_drop.get(a, 0.0)
        if pw + pd > 1.0 + 1e-9:
            raise ValueError(f"p_wrong + p_drop > 1 for {a}: {pw} + {pd}")
        v = getattr(prompt, a)
        u = rng.random()
        if v is not None and u < pw:
            others = [x for x in _VALUES[a] if x != v]
            v = others[int(rng.integers(len(others)))]
        elif u < pw + pd:
            v = None
        kw[a] = v
    return Prompt(**kw)


def corrupt(
    prompt: Prompt,
    rng: np.random.Generator,
    p_wrong: Mapping[str, float] | float = 0.0,
    p_drop: Mapping[str, float] | float = 0.0,
) -> str:
    """Caption text of ``corrupt_prompt(...)``, e.g. "two circles on the left"."""
    return corrupt_prompt(prompt, rng, p_wrong, p_drop).text


def random_scene(rng: np.random.Generator, prompts: Sequence[Prompt] = ALL_PROMPTS) -> Prompt:
    """A uniformly drawn complete prompt from ``prompts``."""
    return prompts[int(rng.integers(len(prompts)))]


def differ_in(scene: Prompt, attr: str, rng: np.random.Generator) -> Prompt:
    """``scene`` with ``attr`` replaced by a uniformly drawn different value."""
    others = [x for x in _VALUES[attr] if x != getattr(scene, attr)]
    return scene.replace(**{attr: others[int(rng.integers(len(others)))]})
