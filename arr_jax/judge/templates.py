"""Prompt templates for rubric induction and judging, and the request they fill.

A template file (``arr_jax/judge/prompts/<name>.txt``) has a ``[system]`` and a ``[user]``
section; lines starting with ``#`` before the first section are comments. Inside a section:

  {{name}}            replaced by ``fields[name]`` (a missing field is an error naming it)
  {{image:ROLE}}      an image slot, filled from ``images[ROLE]`` (e.g. BASE, 1, 2)
  {{images}}          every image in ``images`` except BASE, in order, each preceded by
                      "Image ROLE:"
  {{#name}}..{{/name}}  kept only when ``fields[name]`` is truthy
  {{^name}}..{{/name}}  kept only when ``fields[name]`` is falsy

Images may only appear in the ``[user]`` section. Users override a template by putting a file
of the same name in their own directory (``TemplateSet(override_dir=...)``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
TEMPLATE_NAMES = ("generate", "verify", "refine", "structure", "pairwise", "pointwise", "listwise", "decompose")

# Output budgets per task (tokens); a backend may cap them further.
DEFAULT_MAX_TOKENS = {"generate": 1024, "refine": 1024, "verify": 768, "structure": 2048,
                      "pairwise": 768, "pointwise": 512, "listwise": 768,
                      "decompose": 768}

TASK_DESCRIPTIONS = {
    "t2i": ("Decide which generated image better satisfies the text prompt: every requested "
            "element present with the right attributes, counts and layout, and the image free of "
            "artifacts and pleasing to look at."),
    "edit": ("Decide which edited image better carries out the editing instruction on Image BASE: "
             "the requested change made, everything the instruction does not touch preserved, "
             "the edit blended with consistent lighting and perspective, and no artifacts."),
}

_SECTION = re.compile(r"\{\{([#^])(\w+)\}\}((?:(?!\{\{[#^]\w+\}\}).)*?)\{\{/\2\}\}", re.DOTALL)
_SLOT = re.compile(r"\{\{(image:[\w-]+|images|\w+)\}\}")


@dataclasses.dataclass(eq=False)
class ImagePart:
    """An image inside a request: ``role`` is how the prompt names it ("BASE", "1", "2", ...)."""

    role: str
    image: np.ndarray  # uint8 (H, W, 3)


@dataclasses.dataclass(eq=False)
class ChatRequest:
    """One chat-completion request: a system prompt and an interleaved text/image user turn.

    task:   the template it came from ("generate", "verify", "pairwise", ...).
    fields: the template's text fill values; programmatic backends (the world judge) read
            these instead of natural language. Never sent over HTTP.
    meta:   bookkeeping (pair id, round, order); not part of the prompt or the cache key.
    sample: a sample index; > 0 asks a backend for a different sample of the same prompt.
    """

    task: str
    system: str
    parts: tuple  # of str | ImagePart
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    max_tokens: int | None = None
    sample: int = 0

    @property
    def images(self) -> list[np.ndarray]:
        return [p.image for p in self.parts if isinstance(p, ImagePart)]

    def image(self, role: str) -> np.ndarray | None:
        """The image with ``role`` (None if absent)."""
        for p in self.parts:
            if isinstance(p, ImagePart) and p.role == role:
                return p.image
        return None

    def label(self, index: int | None = None) -> str:
        """How errors and failure reasons name this request: ``request 3 (pairwise, index=1,
        order=rev)`` (``index``: its position in the batch a backend was given)."""
        meta = "".join(f", {k}={v}" for k, v in self.meta.items())
        return f"request{'' if index is None else f' {index}'} ({self.task}{meta})"

    @property
    def user_text(self) -> str:
        """The user turn with each image as ``<image ROLE>``."""
        return "".join(p if isinstance(p, str) else f"<image {p.role}>" for p in self.parts)

    def to_chat(self) -> tuple[list[dict], list[np.ndarray]]:
        """``(messages, images)`` in the format of `arr_jax.judge.processor.Qwen3VLProcessor`:
        content items ``{"type": "text", "text": ...}`` / ``{"type": "image"}``, images in order."""
        content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"}
                   for p in self.parts]
        msgs = []
        if self.system:
            msgs.append({"role": "system", "content": self.system})
        msgs.append({"role": "user", "content": content})
        return msgs, self.images


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    system: str
    user: str
    source: str  # file path it was read from

    @property
    def text(self) -> str:
        return f"[system]\n{self.system}\n[user]\n{self.user}"


def parse_template(text: str, name: str = "template", source: str = "<string>") -> Template:
    """Split a template file into its ``[system]`` and ``[user]`` sections."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        tag = line.strip().lower()
        if tag in ("[system]", "[user]"):
            current = tag[1:-1]
            if current in sections:
                raise ValueError(f"template {name} ({source}) has two {tag} sections")
            sections[current] = []
        elif current is None:
            if line.strip() and not line.lstrip().startswith("#"):
                raise ValueError(f"template {name} ({source}): text before the first section: {line!r}")
        else:
            sections[current].append(line)
    if "user" not in sections:
        raise ValueError(f"template {name} ({source}) has no [user] section")
    system = "\n".join(sections.get("system", [])).strip()
    if "{{image" in system:
        raise ValueError(f"template {name} ({source}): images may only appear in [user]")
    return Template(name, system, "\n".join(sections["user"]).strip(), source)


def _sections(text: str, fields: Mapping[str, Any], where: str) -> str:
    while True:
        m = _SECTION.search(text)
        if m is None:
            return text
        kind, key, body = m.groups()
        if key not in fields:
            raise KeyError(f"{where}: section {{{{{kind}{key}}}}} needs field {key!r}; "
                           f"given {sorted(fields)}")
        keep = bool(fields[key]) if kind == "#" else not fields[key]
        text = text[:m.start()] + (body if keep else "") + text[m.end():]


def render(text: str, fields: Mapping[str, Any], images: Mapping[str, np.ndarray] | None = None,
           where: str = "template") -> list:
    """Fill ``text``: returns a list of str and ImagePart (adjacent strings merged)."""
    text = _sections(text, fields, where)
    images = dict(images or {})
    out: list = []
    pos = 0

    def emit(s):
        if s:
            if out and isinstance(out[-1], str):
                out[-1] += s
            else:
                out.append(s)

    for m in _SLOT.finditer(text):
        emit(text[pos:m.start()])
        pos = m.end()
        key = m.group(1)
        if key.startswith("image:"):
            role = key.split(":", 1)[1]
            if role not in images:
                raise KeyError(f"{where}: needs image {role!r}; given {sorted(images)}")
            out.append(ImagePart(role, images[role]))
        elif key == "images":
            for role, im in images.items():
                if role == "BASE":
                    continue
                emit(f"Image {role}:\n")
                out.append(ImagePart(role, im))
                emit("\n")
        else:
            if key not in fields:
                raise KeyError(f"{where}: needs field {key!r}; given {sorted(fields)}")
            emit(str(fields[key]))
    emit(text[pos:])
    # tidy whitespace left behind by dropped sections
    return [re.sub(r"\n{3,}", "\n\n", p) if isinstance(p, str) else p for p in out]


class TemplateSet:
    """The prompt templates: package defaults, overridden by files in ``override_dir``."""

    def __init__(self, override_dir: str | Path | None = None):
        self.override_dir = Path(override_dir) if override_dir else None
        if self.override_dir is not None and not self.override_dir.is_dir():
            raise FileNotFoundError(f"template override dir {self.override_dir} does not exist")
        self._cache: dict[str, Template] = {}

    def path(self, name: str) -> Path:
        if self.override_dir is not None and (self.override_dir / f"{name}.txt").exists():
            return self.override_dir / f"{name}.txt"
        p = PROMPTS_DIR / f"{name}.txt"
        if not p.exists():
            raise FileNotFoundError(f"no template {name!r}: expected {p}")
        return p

    def get(self, name: str) -> Template:
        if name not in self._cache:
            p = self.path(name)
            self._cache[name] = parse_template(p.read_text(encoding="utf-8"), name, str(p))
        return self._cache[name]

    def fill(self, name: str, fields: Mapping[str, Any], images: Mapping[str, np.ndarray] | None = None,
             meta: Mapping[str, Any] | None = None, max_tokens: int | None = None,
             sample: int = 0) -> ChatRequest:
        """A ChatRequest from template ``name``; images are keyed by role."""
        t = self.get(name)
        system = render(t.system, fields, None, f"{name} [system]")
        system_text = "".join(system).strip()
        parts = render(t.user, fields, images, f"{name} [user]")
        if parts and isinstance(parts[0], str):
            parts[0] = parts[0].lstrip()
        if parts and isinstance(parts[-1], str):
            parts[-1] = parts[-1].rstrip()
        return ChatRequest(task=name, system=system_text, parts=tuple(p for p in parts if not (isinstance(p, str) and not p)),
                           fields=dict(fields), meta=dict(meta or {}),
                           max_tokens=max_tokens or DEFAULT_MAX_TOKENS.get(name), sample=sample)

    def texts(self, names: Sequence[str] = TEMPLATE_NAMES) -> dict[str, str]:
        """Raw template texts by name (for provenance)."""
        return {n: self.get(n).text for n in names}

    def digest(self, names: Sequence[str] = TEMPLATE_NAMES) -> str:
        h = hashlib.sha256()
        for n, t in sorted(self.texts(names).items()):
            h.update(n.encode() + b"\0" + t.encode() + b"\0")
        return h.hexdigest()[:16]
