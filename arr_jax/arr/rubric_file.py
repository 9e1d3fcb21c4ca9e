"""The rubric file: ARR's output, a Theme + Tips protocol that goes verbatim into a judge's
system prompt, stored as readable text next to a JSON record of how it was made.

``<stem>.txt``  the protocol text (what judges read), e.g.::

    Theme 1: Prompt alignment
    - Every object named in the prompt is present.
    - ...

``<stem>.json`` {"format": "arr-rubric/1", "text", "sha256" (of the text), "themes":
[{"name", "tips"}], "provenance": {pairs used, first-pass / refined / discarded counts, model,
prompts, config and its hash, ...}}.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from arr_jax.judge.parsing import parse_themes_text

FORMAT = "arr-rubric/1"


@dataclasses.dataclass
class Theme:
    name: str
    tips: list[str]


@dataclasses.dataclass
class RubricFile:
    themes: list[Theme]
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def text(self) -> str:
        """The protocol text (judges read this verbatim)."""
        blocks = []
        for i, th in enumerate(self.themes, 1):
            blocks.append("\n".join([f"Theme {i}: {th.name}"] + [f"- {t}" for t in th.tips]))
        return "\n\n".join(blocks) + "\n"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def to_json(self) -> dict:
        return {"format": FORMAT, "text": self.text, "sha256": self.sha256,
                "themes": [dataclasses.asdict(t) for t in self.themes], "provenance": self.provenance}

    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``<stem>.txt`` and ``<stem>.json`` (atomically); returns both paths."""
        p = Path(path)
        txt, js = p.with_suffix(".txt"), p.with_suffix(".json")
        txt.parent.mkdir(parents=True, exist_ok=True)
        for dst, data in ((txt, self.text), (js, json.dumps(self.to_json(), indent=2, default=str) + "\n")):
            tmp = dst.with_suffix(dst.suffix + ".tmp")
            tmp.write_text(data, encoding="utf-8")
            os.replace(tmp, dst)
        return txt, js

    @classmethod
    def from_text(cls, text: str, provenance: dict | None = None) -> "RubricFile":
        themes = [Theme(n, tips) for n, tips in parse_themes_text(text)]
        if not themes:
            raise ValueError("no 'Theme N: name' / '- tip' structure found in the rubric text")
        return cls(themes, dict(provenance or {}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RubricFile":
        """From ``<stem>.json`` (preferred) or ``<stem>.txt``; a directory means its rubric.*."""
        p = Path(path)
        if p.is_dir():
            p = p / "rubric.json"
        js, txt = p.with_suffix(".json"), p.with_suffix(".txt")
        if js.exists():
            d = json.loads(js.read_text(encoding="utf-8"))
            if d.get("format") != FORMAT:
                raise ValueError(f"{js}: not a rubric file (format {d.get('format')!r}, expected {FORMAT!r})")
            rf = cls([Theme(t["name"], list(t["tips"])) for t in d["themes"]], d.get("provenance", {}))
            if txt.exists() and txt.read_text(encoding="utf-8") != rf.text:
                raise ValueError(f"{txt} was edited after {js} was written; load the .txt alone "
                                 "(RubricFile.from_text) or regenerate the pair")
            return rf
        if txt.exists():
            return cls.from_text(txt.read_text(encoding="utf-8"))
        raise FileNotFoundError(f"no rubric file at {p} (.json or .txt)")


def load_rubric_text(path: str | os.PathLike) -> str:
    """The protocol text to give a judge: a .txt file verbatim (hand edits welcome), else the
    text recorded in the .json."""
    p = Path(path)
    if p.is_dir():
        p = p / "rubric.txt"
    if p.suffix == ".txt" and p.exists():
        return p.read_text(encoding="utf-8")
    return RubricFile.load(p).text
