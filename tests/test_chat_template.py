"""The judge's prompts come from the snapshot's own chat template, rendered as transformers renders it.

Three templates written here (transformers in the venv ships none): one that behaves like the
Qwen3-VL-Instruct template (vision counting macro, no default system prompt, ``raise_exception`` on an
image in the system turn), a Thinking-style one whose generation prompt opens ``<think>\\n`` unless
``enable_thinking`` is false (as Qwen3's hybrid templates; Qwen3-VL-Thinking always opens it), and a
fine-tuned judge's own (a default system prompt, ``[Candidate k]`` image labels, ``eos_token`` turn ends,
trimmed text). For each, with and without a system prompt and with 1, 2 and 3 images, our token ids
equal transformers' ``Qwen3VLProcessor.apply_chat_template(..., tokenize=True)``.
"""
from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from test_qwen3_vl_processor import PREPROC, snapshot_with_tokenizer

INSTRUCT = r"""
{%- set image_count = namespace(value=0) -%}
{%- set video_count = namespace(value=0) -%}
{%- macro render_content(content, count_vision, in_system=false) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- else -%}
        {%- for item in content -%}
            {%- if item.type == 'image' or 'image' in item or 'image_url' in item -%}
                {%- if in_system -%}{{- raise_exception('System message cannot contain images.') -}}{%- endif -%}
                {%- if count_vision -%}{%- set image_count.value = image_count.value + 1 -%}{%- endif -%}
                {%- if add_vision_id -%}{{- 'Picture ' ~ image_count.value ~ ': ' -}}{%- endif -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif item.type == 'video' or 'video' in item -%}
                {%- if count_vision -%}{%- set video_count.value = video_count.value + 1 -%}{%- endif -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif 'text' in item -%}
                {{- item.text -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if messages[0].role == 'system' -%}
    {{- '<|im_start|>system\n' + render_content(messages[0].content, false, true) + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) -%}
        {{- '<|im_start|>' + message.role + '\n' + render_content(message.content, true) + '<|im_end|>\n' -}}
    {%- elif message.role == 'assistant' -%}
        {{- '<|im_start|>assistant\n' + render_content(message.content, true) + '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

# The Instruct template with a generation prompt that opens a reasoning block.
THINKING = INSTRUCT.replace(r"""{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}""", r"""{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if enable_thinking is defined and enable_thinking is false -%}
        {{- '<think>\n\n</think>\n\n' -}}
    {%- else -%}
        {{- '<think>\n' -}}
    {%- endif -%}
{%- endif -%}""")

JUDGE_SYSTEM = "You are RewardJudge-VL. Compare the candidate images with the request and reply with a JSON verdict."
CUSTOM = r"""
{%- set ns = namespace(images=0, system=false) -%}
{%- for message in messages -%}
    {%- if message.role == 'system' -%}{%- set ns.system = true -%}{%- endif -%}
{%- endfor -%}
{%- if not ns.system -%}
    {{- '<|im_start|>system\n' + '""" + JUDGE_SYSTEM + r"""' + eos_token + '\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {{- '<|im_start|>' + message.role + '\n' -}}
    {%- if message.content is string -%}
        {{- message.content | trim -}}
    {%- else -%}
        {%- for item in message.content -%}
            {%- if item.type == 'image' -%}
                {%- set ns.images = ns.images + 1 -%}
                {{- '[Candidate ' ~ ns.images ~ ']\n<|vision_start|><|image_pad|><|vision_end|>\n' -}}
            {%- elif item.type == 'text' -%}
                {{- item.text | trim -}}
                {%- if not loop.last -%}{{- '\n' -}}{%- endif -%}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- eos_token + '\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

TEMPLATES = {"instruct": INSTRUCT, "thinking": THINKING, "custom": CUSTOM}
TOKENIZER_CONFIG = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
                    "model_max_length": 4096}


@functools.lru_cache(maxsize=None)
def base_snapshot() -> str:
    """The tiny processor snapshot plus ``<think>`` / ``</think>`` added tokens and a ``tokenizer_config.json``."""
    from tokenizers import Tokenizer

    d = Path(tempfile.mkdtemp(prefix="tiny_qwen3_vl_chat_"))
    for f in Path(snapshot_with_tokenizer()).iterdir():
        shutil.copy(f, d / f.name)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_tokens(["<think>", "</think>"])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    return str(d)


def snapshot(name: str, layout: str = "jinja") -> Path:
    """A copy of `base_snapshot` shipping template ``name`` in ``layout``: ``jinja`` (chat_template.jinja),
    ``json`` (chat_template.json), ``tokenizer`` (tokenizer_config.json) or ``none``."""
    d = Path(tempfile.mkdtemp(prefix=f"chat_{name}_{layout}_"))
    for f in Path(base_snapshot()).iterdir():
        shutil.copy(f, d / f.name)
    text = TEMPLATES.get(name, "")
    if layout == "jinja":
        (d / "chat_template.jinja").write_text(text)
    elif layout == "json":
        (d / "chat_template.json").write_text(json.dumps({"chat_template": text}))
    elif layout == "tokenizer":
        (d / "tokenizer_config.json").write_text(json.dumps(dict(TOKENIZER_CONFIG, chat_template=text)))
    return d


@functools.lru_cache(maxsize=None)
def ours(name: str, reasoning: str = "close"):
    from arr_jax.judge.processor import Qwen3VLProcessor

    return Qwen3VLProcessor.from_dir(snapshot(name, "jinja" if name in TEMPLATES else "none"), reasoning=reasoning)


@functools.lru_cache(maxsize=None)
def hf(name: str):
    """transformers' Qwen3VLProcessor with template ``name`` and the snapshot's tokenizer (its special tokens)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor as HFProcessor

    class NoVideoProcessor(HFProcessor):
        """transformers 5 checks the video processor's class, which needs torchvision; skip it for None."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and "video" in argument_name:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    tok = PreTrainedTokenizerFast.from_pretrained(base_snapshot())
    return NoVideoProcessor(image_processor=Qwen2VLImageProcessorPil(**PREPROC), tokenizer=tok, video_processor=None,
                            chat_template=TEMPLATES[name])


def pil_images(n: int):
    from PIL import Image

    rng = np.random.default_rng(n)
    sizes = [(40, 56), (20, 24), (64, 32)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i], 3), dtype=np.uint8)) for i in range(n)]


def judge_chat(n_images: int, system: bool):
    """A judge-like chat: optional system turn, then ``Image k:`` + image for each image and a question."""
    content = []
    for k in range(n_images):
        content += [{"type": "text", "text": f"Image {k + 1}: "}, {"type": "image"}]
    content.append({"type": "text", "text": "  which image is better? answer 1 or 2\n"})
    msgs = [{"role": "system", "content": "Judge according to this rubric: w1x7 w2x1."}] if system else []
    return msgs + [{"role": "user", "content": content}]


def with_images(messages, images):
    """The same chat in transformers' form: each image item carries its image."""
    it = iter(images)
    out = []
    for m in messages:
        c = m["content"]
        if not isinstance(c, str):
            c = [dict(x, image=next(it)) if x.get("type") == "image" else dict(x) for x in c]
        out.append(dict(m, content=c))
    return out


def hf_ids(name, messages, images, **template_kwargs):
    out = hf(name).apply_chat_template(with_images(messages, images), add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="np", **template_kwargs)
    return out["input_ids"][0].tolist()


# ----------------------------------------------------------------------------- parity


@pytest.mark.parity
@pytest.mark.parametrize("n_images", [1, 2, 3])
@pytest.mark.parametrize("system", [True, False])
@pytest.mark.parametrize("name", ["instruct", "thinking", "custom"])
def test_token_ids_match_apply_chat_template(name, system, n_images):
    """Our ids (template rendered here, images expanded by our processor) == transformers' processor's
    ``apply_chat_template(tokenize=True)``. For the Thinking-style template ours closes the opened block
    empty, which is the template's own ``enable_thinking=False`` rendering."""
    p = ours(name)
    msgs, imgs = judge_chat(n_images, system), pil_images(n_images)
    got, _, grid = p.encode(p.format_chat(msgs), imgs)
    want = hf_ids(name, msgs, imgs, **({"enable_thinking": False} if name == "thinking" else {}))
    assert got == want
    assert len(grid) == n_images and got.count(p.image_token_id) == int(grid.prod(-1).sum()) // 4
    text = p.decode(got, skip_special_tokens=False)
    if name == "custom" and not system:
        assert JUDGE_SYSTEM in text                         # the fine-tuned judge's own system prompt
    if name == "thinking":
        assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parity
def test_thinking_template_open_block_and_its_own_switch():
    """Without the switch the template opens ``<think>\\n`` (transformers renders exactly that); ``reasoning=
    "close"`` turns it into the empty block, "refuse" is an error naming the template, and passing the
    template's own ``enable_thinking=False`` is rendered untouched."""
    from arr_jax.judge.processor import Qwen3VLProcessor

    msgs, imgs = judge_chat(2, True), pil_images(2)
    opened = hf(name="thinking").apply_chat_template(with_images(msgs, imgs), add_generation_prompt=True,
                                                     tokenize=False)
    assert opened.endswith("<|im_start|>assistant\n<think>\n")
    assert ours("thinking").format_chat(msgs) == opened.removesuffix("<think>\n") + "<think>\n\n</think>\n\n"
    with pytest.raises(ValueError, match=r"chat_template\.jinja opens a reasoning block.*'<think>\\n'"):
        ours("thinking", "refuse").format_chat(msgs)
    own = Qwen3VLProcessor.from_dir(snapshot("thinking"), reasoning="refuse",
                                    template_kwargs={"enable_thinking": False})
    got, _, _ = own.encode(own.format_chat(msgs), imgs)
    assert got == hf_ids("thinking", msgs, imgs, enable_thinking=False)
    # no generation prompt: the conversation alone, as transformers renders it
    assert ours("thinking").format_chat(msgs, add_generation_prompt=False) == hf("thinking").apply_chat_template(
        with_images(msgs, imgs), add_generation_prompt=False, tokenize=False)


@pytest.mark.parity
@pytest.mark.parametrize("name", ["instruct", "thinking"])
def test_answer_prefix_follows_the_generation_prompt(name):
    """The processor batch with the choice-scoring prefix (`RANK_PREFIX`) is the template's generation prompt
    (closed-empty reasoning for the Thinking one) followed by the prefix, token for token as transformers'
    processor tokenises that text."""
    from arr_jax.judge.vlm_backend import RANK_PREFIX

    p = ours(name)
    msgs, imgs = judge_chat(2, True), pil_images(2)
    batch = p([(msgs, imgs)], assistant_prefix=RANK_PREFIX, seq_bucket=None, patch_bucket=None, image_bucket=None)
    ids = batch["input_ids"][0][batch["attention_mask"][0] > 0].tolist()
    rendered = hf(name).apply_chat_template(with_images(msgs, imgs), add_generation_prompt=True, tokenize=False,
                                            **({"enable_thinking": False} if name == "thinking" else {}))
    want = hf(name)(text=[rendered + RANK_PREFIX], images=imgs, return_tensors="np")["input_ids"][0].tolist()
    assert ids == want
    tail = "<think>\n\n</think>\n\n" if name == "thinking" else ""
    assert p.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n" + tail + RANK_PREFIX)


# ----------------------------------------------------------------------------- where the template comes from


@pytest.mark.parity
def test_template_file_resolution_agrees_with_transformers(tmp_path):
    """Each place a snapshot can keep its template is found; where transformers' processor and tokenizer
    read the same files, they get the same template, and the tokenizer renders the same text."""
    from transformers import PreTrainedTokenizerFast
    from transformers.processing_utils import ProcessorMixin

    from arr_jax.judge.chat_template import ChatTemplate

    msgs = judge_chat(1, True)
    for layout in ("jinja", "json", "tokenizer"):
        d = snapshot("custom", layout)
        t = ChatTemplate.from_dir(d)
        assert t.source == CUSTOM and t.origin.endswith({"jinja": "chat_template.jinja", "json": "chat_template.json",
                                                         "tokenizer": "tokenizer_config.json"}[layout])
        assert t.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        if layout != "tokenizer":
            assert ProcessorMixin.get_processor_dict(str(d))[0]["chat_template"] == CUSTOM
        if layout != "json":
            hf_tok = PreTrainedTokenizerFast.from_pretrained(str(d))
            assert t.render(msgs, True) == hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    # the processor's legacy file wins over chat_template.jinja (as in transformers), which wins over the tokenizer's
    d = snapshot("custom", "tokenizer")
    (d / "chat_template.jinja").write_text(INSTRUCT)
    assert ChatTemplate.from_dir(d).source == INSTRUCT
    (d / "chat_template.json").write_text(json.dumps({"chat_template": THINKING}))
    assert ChatTemplate.from_dir(d).source == THINKING == ProcessorMixin.get_processor_dict(str(d))[0]["chat_template"]
    # a named set in tokenizer_config.json uses its "default"
    (d / "chat_template.json").unlink()
    (d / "chat_template.jinja").unlink()
    named = [{"name": "tool_use", "template": INSTRUCT}, {"name": "default", "template": CUSTOM}]
    (d / "tokenizer_config.json").write_text(json.dumps(dict(TOKENIZER_CONFIG, chat_template=named)))
    assert ChatTemplate.from_dir(d).source == CUSTOM


def test_snapshot_without_template_uses_the_builtin_format():
    p = ours("none")
    assert p.chat_template is None
    assert p.format_chat(judge_chat(1, False)) == (
        "<|im_start|>user\nImage 1: <|vision_start|><|image_pad|><|vision_end|>  which image is better? answer 1 "
        "or 2\n<|im_end|>\n<|im_start|>assistant\n")


def test_template_errors_name_the_template(tmp_path):
    from arr_jax.judge.chat_template import ChatTemplate
    from arr_jax.judge.processor import Qwen3VLProcessor

    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}\n{% if %}")
    with pytest.raises(ValueError, match=r"chat_template\.jinja does not compile \(line 2\)"):
        ChatTemplate.from_dir(tmp_path)
    image_in_system = [{"role": "system", "content": [{"type": "image"}]}, {"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match=r"chat_template\.jinja failed on this chat: System message cannot contain"):
        ours("instruct").format_chat(image_in_system)
    (tmp_path / "chat_template.jinja").write_text(" \n")
    with pytest.raises(ValueError, match=r"chat_template\.jinja is empty"):
        ChatTemplate.from_dir(tmp_path)
    with pytest.raises(ValueError, match="reasoning must be one of"):
        Qwen3VLProcessor.from_dir(snapshot("instruct"), reasoning="keep")
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "tool_use",
                                                                                   "template": "x"}]}))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: chat_template is a set of named templates "
                                         r"\['tool_use'\] with no 'default'"):
        ChatTemplate.from_dir(tmp_path)


def test_template_sees_plain_data_like_transformers():
    """Keys with None values are dropped, non-JSON values become ``"<TypeName>"``, numpy scalars numbers,
    reasoning fields are aliased; the sandbox refuses underscore attributes; ``tojson`` keeps non-ASCII."""
    from arr_jax.judge.chat_template import ChatTemplate

    t = ChatTemplate("{% for m in messages %}{{ m | tojson }}|{% endfor %}")
    msgs = [{"role": "user", "content": "é", "name": None, "n": np.int64(3), "img": np.zeros(2)},
            {"role": "assistant", "content": "ok", "reasoning": "hm"}]
    assert t.render(msgs) == ('{"role": "user", "content": "é", "n": 3, "img": "<ndarray>"}|'
                              '{"thinking": "hm", "role": "assistant", "content": "ok", "reasoning": "hm", '
                              '"reasoning_content": "hm"}|')
    with pytest.raises(ValueError, match="namespace attribute '_x'"):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render([])


@pytest.mark.parity
def test_template_language_features_render_as_transformers():
    """The pieces of transformers' jinja environment other templates lean on: ``{% generation %}``, loop controls,
    ``tojson`` options, ``dict``, ``namespace``, special tokens and extra keyword arguments, trim / lstrip."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from arr_jax.judge.chat_template import ChatTemplate

    templates = [
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
        "{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}",
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% if m.role == 'system' %}"
        "{% continue %}{% endif %}[{{ m.content }}]{% endfor %}{{ eos_token }}",
        "{{ messages | tojson(indent=2, sort_keys=True) }}{{ dict(a=1, b=[2]) | tojson(separators=(',', ':')) }}",
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + m.content | length %}{% endfor %}"
        "{{ ns.n }} {{ bos_token is defined }} {{ judge_name | default('none') }}",
        "{%- for m in messages %}\n    <{{ m.role }}>\n  {{- m.content -}}\n    </{{ m.role }}>\n{% endfor %}\n"
        "{%- if add_generation_prompt %}<assistant>{% endif %}",
    ]
    msgs = [{"role": "system", "content": "Rubric: é ✓"}, {"role": "user", "content": "which?"},
            {"role": "assistant", "content": "1"}, {"role": "user", "content": "sure?"}]
    special = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    for source in templates:
        for gen in (False, True):
            for extra in ({}, {"judge_name": "rj"}):
                want = render_jinja_template(conversations=[msgs], chat_template=source, add_generation_prompt=gen,
                                             **special, **extra)[0][0]
                assert ChatTemplate(source, special_tokens=special).render(msgs, gen, **extra) == want, source
