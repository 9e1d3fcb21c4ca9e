"""The synthetic world's programmatic judge as an ARR text backend, and world preference pairs.

`WorldBackend` answers every request of the ARR pipeline "in its own way", with text that goes
through the same parsers as a VLM's answers:

  generate / decompose
             first-pass (or prompt-specific) rubrics from the prompt alone: one criterion per attribute the prompt
             names, in salience order (colour, shape, count, position, clean background), the
             first K, as ``{"rubrics": [...]}`` JSON
  refine     rubrics from the evidence: the criteria (checked with `WorldJudge`) the preferred
             image passes and the rejected one fails come first, then the rest of the prompt's;
             a pair whose label no criterion explains (a noisy label) cannot be fixed
  verify / pairwise / pointwise / listwise
             the criteria named in the rubric text (keywords: colour, shape, count / number,
             position / half, background / speck), or ``default_criteria`` when there is no
             rubric, checked per image with `WorldJudge`; more satisfied wins. Ties are
             forbidden, so an undecided pair goes to Image 1 (``tie_break="first"``): a
             positional bias like a VLM's, which the swapped-order evaluation exposes.
  structure  Theme + Tips JSON, coarse to fine, over the criteria the verified rubric sets use

It reads the structured ``ChatRequest.fields`` (prompt, rubric text, preferred index) and the
images instead of natural language. The direct judge (no rubric) only checks colour and shape
by default: a stand-in for a judge that misses counts and layout unless told to look.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Sequence

import numpy as np

from arr_jax.data.preference_tfds import PreferencePair
from arr_jax.judge.templates import ChatRequest
from arr_jax.world import render, spec
from arr_jax.world.judge import CRITERIA, WorldJudge

SALIENCE = ("colour", "shape", "count", "position", "clean_background")
_KEYWORDS = {
    "colour": r"\bcolou?rs?\b",
    "shape": r"\bshapes?\b",
    "count": r"\bcount\b|\bnumber of objects\b|\bhow many\b|\bexactly (?:one|two|three|\d+)\b",
    "position": r"\bposition\b|\bhalf\b|\bplacement\b",
    "clean_background": r"\bbackground\b|\bspecks?\b",
}
_THEMES = (  # coarse -> fine
    ("Prompt alignment: object identity", ("colour", "shape")),
    ("Composition: count and placement", ("count", "position")),
    ("Rendering quality", ("clean_background",)),
)
_TIPS = {
    "colour": "Every object has the colour named in the prompt.",
    "shape": "Every object has the shape named in the prompt.",
    "count": "The number of objects equals the count stated in the prompt.",
    "position": "All objects lie in the half of the canvas named in the prompt (the position).",
    "clean_background": "The background is clean and dark, without stray specks.",
}


def criteria_in(text: str) -> list[str]:
    """World criteria a rubric text talks about, in CRITERIA order."""
    t = str(text).lower()
    return [c for c in CRITERIA if re.search(_KEYWORDS[c], t)]


def rubric_sentence(criterion: str, p: spec.Prompt) -> str:
    """A pair-specific, single-image, binary rubric for one criterion."""
    if criterion == "colour":
        return f"Every object in the image is {p.colour} (its colour matches the prompt)."
    if criterion == "shape":
        return f"Every object is a {p.shape} (its shape matches the prompt)."
    if criterion == "count":
        word = spec.COUNT_WORDS[p.count - 1]
        return f"The image shows exactly {word} object{'s' if p.count != 1 else ''} (the count matches the prompt)."
    if criterion == "position":
        return f"All objects lie in the {p.position} half of the image (the position matches the prompt)."
    return "The background is clean and dark, with no stray specks."


class WorldBackend:
    """TextBackend answering ARR requests with `WorldJudge` (see module docstring).

    Args:
      judge: the WorldJudge doing the image analysis.
      default_criteria: what a judge checks with no rubric in its prompt.
      tie_break: "first" (answer Image 1), "second", or "hash" (a fixed pseudo-random pick).
    """

    name = "world"

    def __init__(self, judge: WorldJudge | None = None, default_criteria: Sequence[str] = ("colour", "shape"),
                 tie_break: str = "first"):
        bad = [c for c in default_criteria if c not in CRITERIA]
        if bad or tie_break not in ("first", "second", "hash"):
            raise ValueError(f"bad WorldBackend settings: criteria {bad}, tie_break {tie_break!r}")
        self.judge = judge or WorldJudge()
        self.default_criteria = tuple(default_criteria)
        self.tie_break = tie_break
        self._detections: dict[bytes, object] = {}
        self.calls: dict[str, int] = {}

    # -- image analysis ------------------------------------------------------------------
    def _verdicts(self, prompt: spec.Prompt, image: np.ndarray) -> dict[str, bool]:
        key = hashlib.sha1(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).digest()
        det = self._detections.get(key)
        if det is None:
            det = self._detections[key] = self.judge.describe(image)
            if len(self._detections) > 20000:
                self._detections.clear()
        return self.judge.verdicts(prompt, det)

    def _criteria(self, rubric_text: str) -> list[str]:
        return criteria_in(rubric_text) or list(self.default_criteria)

    def _prompt_criteria(self, p: spec.Prompt) -> list[str]:
        return [c for c in SALIENCE if c == "clean_background" or getattr(p, c) is not None]

    # -- tasks ---------------------------------------------------------------------------
    def _rubrics(self, req: ChatRequest, from_evidence: bool) -> str:
        f = req.fields
        p = spec.parse_prompt(f["prompt"])
        order = self._prompt_criteria(p)
        k = int(f["k"])
        reason = "Criteria from the attributes the prompt names."
        if from_evidence:
            pref = req.image(str(f["preferred"]))
            rej = req.image(str(f["rejected"]))
            vp, vr = self._verdicts(p, pref), self._verdicts(p, rej)
            explains = [c for c in order if vp[c] and not vr[c]]
            if explains:
                order = explains + [c for c in order if c not in explains]
                reason = f"The rejected image fails: {', '.join(explains)}."
            else:  # no criterion explains the label: try the next ones in turn
                r = int(f.get("round", 1)) % len(order)
                order = order[r:] + order[:r]
                reason = "No checkable criterion separates the images in the stated direction."
        return json.dumps({"rubrics": [rubric_sentence(c, p) for c in order[:k]], "reason": reason})

    def _pair(self, req: ChatRequest, rubric_text: str) -> str:
        p = spec.parse_prompt(req.fields["prompt"])
        crit = self._criteria(rubric_text)
        n = [sum(self._verdicts(p, req.image(r))[c] for c in crit) for r in ("1", "2")]
        if n[0] != n[1]:
            w = 1 if n[0] > n[1] else 2
            why = f"Image {w} satisfies {max(n)}/{len(crit)} of {', '.join(crit)}; the other {min(n)}."
        else:
            if self.tie_break == "hash":
                w = 1 + hashlib.sha1(req.user_text.encode()).digest()[0] % 2
            else:
                w = 1 if self.tie_break == "first" else 2
            why = f"Both satisfy {n[0]}/{len(crit)} of {', '.join(crit)}; no difference found."
        return json.dumps({"rank": [1, 2] if w == 1 else [2, 1], "reason": why})

    def _point(self, req: ChatRequest) -> str:
        p = spec.parse_prompt(req.fields["prompt"])
        crit = self._criteria(req.fields.get("rubric", ""))
        v = self._verdicts(p, req.image("1"))
        k = sum(v[c] for c in crit)
        return json.dumps({"score": 1 + int(round(4 * k / len(crit))), "reason": f"{k}/{len(crit)} criteria met"})

    def _list(self, req: ChatRequest) -> str:
        p = spec.parse_prompt(req.fields["prompt"])
        crit = self._criteria(req.fields.get("rubric", ""))
        n = int(req.fields["n"])
        sat = [sum(self._verdicts(p, req.image(str(i + 1)))[c] for c in crit) for i in range(n)]
        order = sorted(range(n), key=lambda i: (-sat[i], i))  # ties: earlier image first
        ranks = [0] * n
        for r, i in enumerate(order, 1):
            ranks[i] = r
        return json.dumps({"ranks": ranks, "reason": f"criteria met: {sat}"})

    def _structure(self, req: ChatRequest) -> str:
        sets = [s for s in re.split(r"\n\s*\n", str(req.fields["rubric_sets"])) if s.strip()]
        support = {c: sum(c in criteria_in(s) for s in sets) for c in CRITERIA}
        themes = []
        for name, crits in _THEMES:
            tips = [_TIPS[c] for c in sorted(crits, key=lambda c: -support[c]) if support[c] > 0]
            if tips:
                themes.append({"name": name, "tips": tips[: int(req.fields["tips_per_theme"])]})
        themes = themes[: int(req.fields["max_themes"])]
        return json.dumps({"themes": themes, "reason": f"support over {len(sets)} sets: {support}"})

    def answer(self, req: ChatRequest) -> str:
        """The answer text for one request."""
        self.calls[req.task] = self.calls.get(req.task, 0) + 1
        if req.task in ("generate", "decompose"):
            return self._rubrics(req, from_evidence=False)
        if req.task == "refine":
            return self._rubrics(req, from_evidence=True)
        if req.task == "verify":
            return self._pair(req, req.fields["rubrics"])
        if req.task == "pairwise":
            return self._pair(req, req.fields.get("rubric", ""))
        if req.task == "pointwise":
            return self._point(req)
        if req.task == "listwise":
            return self._list(req)
        if req.task == "structure":
            return self._structure(req)
        raise ValueError(f"WorldBackend cannot answer task {req.task!r}")

    def generate(self, requests: Sequence[ChatRequest]) -> list[str]:
        """Answers in order; a prompt outside the world grammar gets a refusal (which the
        parsers count as a failure) instead of an exception."""
        out = []
        for r in requests:
            try:
                out.append(self.answer(r))
            except ValueError as e:
                out.append(f"I cannot judge this request: {e}")
        return out


def world_pairs(n: int, seed: int = 0, prompts: Sequence[spec.Prompt] = spec.TRAIN_PROMPTS,
                image_size: int = 32, label_noise: float = 0.0, preferred_first: bool = True,
                attributes: Sequence[str] = spec.ATTRIBUTES, id_prefix: str = "world") -> list[PreferencePair]:
    """Labelled world pairs: a render of the prompt vs a render of the prompt with one
    attribute changed (``category`` = that attribute). ``preferred_first`` puts the labelled
    winner in image 1 (the HPDv3 layout); with probability ``label_noise`` the label is wrong
    (``meta["noisy"]``), as human annotations sometimes are."""
    rng = np.random.default_rng([seed, 7])
    scenes, others, attrs = [], [], []
    for _ in range(n):
        s = prompts[int(rng.integers(len(prompts)))]
        a = attributes[int(rng.integers(len(attributes)))]
        scenes.append(s)
        attrs.append(a)
        others.append(spec.differ_in(s, a, rng))
    good = render.render_batch(scenes, rng, image_size)
    bad = render.render_batch(others, rng, image_size)
    noisy = rng.random(n) < label_noise
    flip = rng.random(n) < 0.5
    out = []
    for i in range(n):
        win, lose = (bad[i], good[i]) if noisy[i] else (good[i], bad[i])
        first = preferred_first or not flip[i]
        out.append(PreferencePair(
            id=f"{id_prefix}-{seed}-{i:05d}", prompt=scenes[i].text,
            image1=win if first else lose, image2=lose if first else win, label=1 if first else 2,
            category=attrs[i], meta={"noisy": bool(noisy[i]), "other": others[i].text}))
    return out
