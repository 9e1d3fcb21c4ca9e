"""A model snapshot's own Jinja chat template, rendered the way transformers' ``apply_chat_template`` does.

A judge must see its prompt in the format the model was trained on, so the prompt text comes from
the template the snapshot ships, not from a hand-written format (Qwen3-VL-Thinking, for example,
opens ``<think>\\n`` after ``<|im_start|>assistant\\n``; fine-tuned judges ship their own system
prompts and layouts).

Where the template is read from (`ChatTemplate.from_dir`; the first one found wins). The order is
that of transformers' processor (which reads 1-3), then its tokenizer (4):

  1. ``processor_config.json``, key ``"chat_template"``;
  2. ``chat_template.json`` (``{"chat_template": "..."}``, the legacy processor file);
  3. ``chat_template.jinja``;
  4. ``tokenizer_config.json``, key ``"chat_template"``: a string, or a list of
     ``{"name", "template"}`` of which the one named ``"default"`` is used.

Rendering follows transformers 5 (``transformers/utils/chat_template_utils.py``,
``render_jinja_template`` and the tokenizer's / processor's ``apply_chat_template``):

  * jinja2's ``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and ``lstrip_blocks``, the
    ``loopcontrols`` extension and a ``{% generation %}...{% endgeneration %}`` tag (renders its body);
  * the ``tojson`` filter is ``json.dumps`` (``ensure_ascii=False``, optional ``indent``,
    ``separators``, ``sort_keys``); globals ``raise_exception``, ``strftime_now``, a ``dict``
    constructor and a ``namespace`` that refuses underscore names;
  * variables: ``messages``, ``tools=None``, ``documents=None``, ``add_generation_prompt``, the
    tokenizer's named special tokens (``bos_token``, ``eos_token``, ``unk_token``, ``sep_token``,
    ``pad_token``, ``cls_token``, ``mask_token``, from ``tokenizer_config.json`` or
    ``special_tokens_map.json``) and any extra template keyword arguments (which win over them);
  * messages reach the template as plain data: keys whose value is None dropped, values that are not
    JSON types (images, arrays) replaced by ``"<TypeName>"``, and a reasoning field
    (``reasoning_content`` / ``thinking`` / ``reasoning``) copied under ``thinking`` and
    ``reasoning_content``.

jinja2 is a run-time dependency of arr_jax (pinned in setup.py); transformers is not imported.
"""
from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
EMPTY_THINK = "<think>\n\n</think>\n\n"   # what Qwen3-style templates render with enable_thinking=False
REASONING_POLICIES = ("close", "refuse")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _token_text(value: Any) -> str | None:
    """A special token from a tokenizer config: a string, or an AddedToken dict with ``content``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


def _template_text(value: Any, where: str) -> str:
    """The template string of a ``chat_template`` value: a string, a list of ``{"name", "template"}``
    or a ``{name: template}`` mapping (named sets use their ``"default"``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
    if isinstance(value, Mapping):
        if isinstance(value.get("default"), str):
            return value["default"]
        raise ValueError(f"{where}: chat_template is a set of named templates {sorted(map(str, value))} "
                         "with no 'default' one")
    raise ValueError(f"{where}: chat_template is a {type(value).__name__}, not a string")


def special_tokens_from_dir(model_dir: str | Path) -> dict[str, str]:
    """The named special tokens (``bos_token`` ...) a template sees, from ``tokenizer_config.json``, then
    ``special_tokens_map.json`` for names the first leaves unset; tokens that are null are left out."""
    d = Path(model_dir)
    out: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (d / name).exists():
            data = _read_json(d / name)
            for key in SPECIAL_TOKEN_NAMES:
                text = _token_text(data.get(key))
                if key not in out and text is not None:
                    out[key] = text
    return out


# ----------------------------------------------------------------------------- message data


def _plain(value: Any) -> Any:
    """Plain JSON-like data for the template: containers and dataclasses rebuilt, numpy scalars as Python
    numbers, other objects (images, arrays) as ``"<TypeName>"``."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """``messages`` as the template sees them (see the module docstring); raises TypeError for a
    message that is not a mapping."""
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise TypeError(f"chat message {i} is a {type(msg).__name__}, not a dict")
        m = _plain({k: v for k, v in msg.items() if v is not None})
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


# ----------------------------------------------------------------------------- jinja environment


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks): its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """jinja's ``namespace`` without underscore attributes (no reach into Python internals)."""

        def __init__(*args, **kwargs):  # noqa: N805 (jinja's own signature trick keeps `self` free)
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set the namespace attribute {name!r}")

    class DictMaker:
        """``dict(...)`` and ``dict.fromkeys(...)`` inside a template, nothing else of the type."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=DictMaker(), namespace=Namespace)
    return env


# ----------------------------------------------------------------------------- the template


@dataclasses.dataclass(eq=False)
class ChatTemplate:
    """A compiled chat template.

    source: the Jinja text; origin: where it came from (a file, ``file:key``), named in errors;
    special_tokens: ``{"bos_token": ..., ...}`` passed to the template (`special_tokens_from_dir`).
    Raises ValueError (naming ``origin`` and the line) for a template that does not compile.
    """

    source: str
    origin: str = "<chat template>"
    special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        import jinja2

        try:
            self._compiled = _environment().from_string(self.source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"chat template {self.origin} does not compile (line {e.lineno}): {e.message}") from None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ChatTemplate | None":
        """The template a snapshot ships (see the module docstring for the search order), or None."""
        d = Path(model_dir)
        source = origin = None
        if (d / "processor_config.json").exists():
            value = _read_json(d / "processor_config.json").get("chat_template")
            if value is not None:
                source, origin = _template_text(value, str(d / "processor_config.json")), "processor_config.json"
        if source is None and (d / "chat_template.json").exists():
            value = _read_json(d / "chat_template.json").get("chat_template")
            source, origin = _template_text(value, str(d / "chat_template.json")), "chat_template.json"
        if source is None and (d / "chat_template.jinja").exists():
            source, origin = (d / "chat_template.jinja").read_text(encoding="utf-8"), "chat_template.jinja"
        if source is None and (d / "tokenizer_config.json").exists():
            value = _read_json(d / "tokenizer_config.json").get("chat_template")
            if value is not None:
                source, origin = _template_text(value, str(d / "tokenizer_config.json")), "tokenizer_config.json"
        if source is None:
            return None
        if not source.strip():
            raise ValueError(f"chat template {d / origin} is empty")
        return cls(source, origin=str(d / origin), special_tokens=special_tokens_from_dir(d))

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
               **template_kwargs: Any) -> str:
        """The chat text, exactly as ``apply_chat_template(messages, add_generation_prompt=...,
        tokenize=False, **template_kwargs)`` renders it. A template that refuses the chat
        (``raise_exception``) or fails while rendering is a ValueError naming ``origin``."""
        import jinja2

        variables = {**self.special_tokens, **_plain(dict(template_kwargs))}
        try:
            return self._compiled.render(messages=template_messages(messages), tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template {self.origin} failed on this chat: {e}") from None

    def prompt(self, messages: Sequence[Mapping[str, Any]], *, reasoning: str = "close",
               **template_kwargs: Any) -> str:
        """The chat rendered with its generation prompt, ready for the answer to follow.

        When the generation prompt leaves a reasoning block open (it ends inside ``<think>``, as
        Qwen3-VL-Thinking's ``<|im_start|>assistant\\n<think>\\n``), ``reasoning`` decides, explicitly:
          * ``"close"``: the open block becomes an empty closed one, ``<think>\\n\\n</think>\\n\\n``
            (the model's own non-thinking form), so the answer (and a choice-scoring prefix) comes next;
          * ``"refuse"``: a ValueError naming the template.
        A template with a switch for this (e.g. ``enable_thinking=False``) can be given it in
        ``template_kwargs`` instead; nothing is changed then.
        """
        if reasoning not in REASONING_POLICIES:
            raise ValueError(f"reasoning must be one of {REASONING_POLICIES}, got {reasoning!r}")
        text = self.render(messages, True, **template_kwargs)
        base = self.render(messages, False, **template_kwargs)
        start = len(base) if text.startswith(base) else 0          # where the generation prompt begins
        gen = text[start:]
        i = gen.rfind(THINK_OPEN)
        if i < 0 or gen.find(THINK_CLOSE, i) >= 0:
            return text
        if reasoning == "refuse":
            raise ValueError(f"chat template {self.origin} opens a reasoning block in its generation prompt "
                             f"({gen[i:]!r}): a judge answer read after it would not be the model's answer; use "
                             "reasoning='close' to close it empty (the model's non-thinking form) or a template "
                             "that does not open one")
        return text[:start + i] + EMPTY_THINK
