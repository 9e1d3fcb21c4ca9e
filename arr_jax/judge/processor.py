"""Qwen3-VL prompt and image processing without transformers (PIL + numpy + `tokenizers`).

Matches the Hugging Face ``Qwen3VLProcessor`` with its PIL image processor:
  * images are converted to RGB by `arr_jax.data.images.to_rgb_uint8` (transparency composited on
    white, as transformers' ``convert_to_rgb``; 16-bit and float images scaled), resized with bicubic
    resampling so both sides are multiples of ``patch_size * merge_size`` and the pixel count lies
    within ``[min_pixels, max_pixels]`` (`smart_resize`), scaled to [0, 1] and normalised;
  * patchified into ``(grid_h * grid_w, C * T * P * P)`` rows in spatial-merge-block order, the
    still image repeated over the ``T = temporal_patch_size`` frames;
  * each image in the chat becomes ``<|vision_start|><|image_pad|>*n<|vision_end|>`` with
    ``n = grid_h * grid_w / merge^2``;
  * chats are rendered with the snapshot's own chat template, as transformers' ``apply_chat_template``
    renders it (`arr_jax.judge.chat_template`); a generation prompt that opens a reasoning block is
    closed empty or refused (``reasoning``). Only a snapshot that ships no template gets the
    hand-written Qwen ``<|im_start|>role ... <|im_end|>`` format.

For jit-friendly static shapes a batch is left-padded to a multiple of ``seq_bucket`` tokens, each
image's patch row to a multiple of ``patch_bucket`` patches and the image count to a multiple of
``image_bucket`` (padded patches are masked out of attention and never reach the language model);
with fixed-size images (e.g. generated 1024^2 pairs) every batch then has the same shapes.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from arr_jax.data.images import ImageDecodeError, to_rgb_uint8
from arr_jax.judge import parsing
from arr_jax.judge.base import InputError
from arr_jax.judge.chat_template import REASONING_POLICIES, ChatTemplate
from arr_jax.judge.decode import left_pad
from arr_jax.models.qwen3_vl import Qwen3VLConfig, prepare_inputs


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ImageConfig":
        """From ``preprocessor_config.json`` (``size`` dict or legacy ``min_pixels``/``max_pixels``)."""
        size = d.get("size") or {}
        return cls(
            patch_size=d.get("patch_size", 16), temporal_patch_size=d.get("temporal_patch_size", 2),
            merge_size=d.get("merge_size", 2),
            min_pixels=d.get("min_pixels") or size.get("shortest_edge", 65536),
            max_pixels=d.get("max_pixels") or size.get("longest_edge", 16777216),
            image_mean=tuple(d.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(d.get("image_std", (0.5, 0.5, 0.5))))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


# ----------------------------------------------------------------------------- images


def load_image(src: Any) -> Image.Image:
    """PIL RGB image of ``src`` (path, bytes, PIL image or array) by `arr_jax.data.images.to_rgb_uint8`:
    transparency composited on white, 16-bit / float images scaled; `ImageDecodeError` naming the input."""
    return Image.fromarray(to_rgb_uint8(src))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target ``(h, w)``: multiples of ``factor``, pixel count within bounds, aspect ratio kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be at most 200, got {max(height, width) / min(height, width)} "
                         f"({height}x{width} pixels)")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def patchify(image: np.ndarray, cfg: ImageConfig) -> tuple[np.ndarray, int, int]:
    """``(C, H, W)`` float32 → ``(gh * gw, C * T * P * P)`` in merge-block order, ``gh``, ``gw``."""
    c, h, w = image.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = h // p, w // p
    x = image.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # (bh, bw, m, m, C, p, p)
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t, p, p))
    return np.ascontiguousarray(x).reshape(gh * gw, c * t * p * p), gh, gw


def preprocess_image(src: Any, cfg: ImageConfig) -> tuple[np.ndarray, np.ndarray]:
    """One image → ``(patches (N, patch_dim) float32, grid_thw (3,) int64)``."""
    img = load_image(src)
    h, w = smart_resize(img.height, img.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    if (h, w) != (img.height, img.width):
        img = img.resize((w, h), resample=Image.BICUBIC)
    x = np.asarray(img, np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
    mean = np.asarray(cfg.image_mean, np.float32)[:, None, None]
    std = np.asarray(cfg.image_std, np.float32)[:, None, None]
    patches, gh, gw = patchify((x - mean) / std, cfg)
    return patches, np.array([1, gh, gw], np.int64)


# ----------------------------------------------------------------------------- processor


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


class Qwen3VLProcessor:
    """Chat formatting, tokenisation and image preprocessing for Qwen3-VL.

    ``tokenizer`` is a `tokenizers.Tokenizer` whose vocabulary holds the Qwen special tokens.
    """

    IMAGE, VSTART, VEND = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
    IM_START, IM_END = "<|im_start|>", "<|im_end|>"

    def __init__(self, tokenizer, image_cfg: ImageConfig, model_cfg: Qwen3VLConfig | None = None,
                 chat_template: ChatTemplate | None = None, *, reasoning: str = "close",
                 template_kwargs: dict[str, Any] | None = None):
        if reasoning not in REASONING_POLICIES:
            raise ValueError(f"reasoning must be one of {REASONING_POLICIES}, got {reasoning!r}")
        self.tokenizer = tokenizer
        self.image_cfg = image_cfg
        self.model_cfg = model_cfg
        self.chat_template = chat_template
        self.reasoning = reasoning
        self.template_kwargs = dict(template_kwargs or {})
        self.image_token_id = self._special(self.IMAGE)
        self.im_end_id = self._special(self.IM_END)
        pad = tokenizer.token_to_id("<|endoftext|>")
        self.pad_id = self.im_end_id if pad is None else pad
        if model_cfg is not None and model_cfg.image_token_id != self.image_token_id:
            raise ValueError(f"tokenizer has {self.IMAGE}={self.image_token_id} but the model config says "
                             f"{model_cfg.image_token_id}")

    def _special(self, tok: str) -> int:
        i = self.tokenizer.token_to_id(tok)
        if i is None:
            raise ValueError(f"tokenizer has no {tok} token; is this a Qwen3-VL tokenizer?")
        return i

    @classmethod
    def from_dir(cls, model_dir: str | Path, *, reasoning: str = "close",
                 template_kwargs: dict[str, Any] | None = None) -> "Qwen3VLProcessor":
        """From a snapshot with ``tokenizer.json``, ``preprocessor_config.json`` (and ``config.json``),
        with the chat template it ships (`ChatTemplate.from_dir`; None: the built-in Qwen format).
        ``reasoning`` and ``template_kwargs``: see `format_chat`."""
        from tokenizers import Tokenizer

        d = Path(model_dir)
        for name in ("tokenizer.json", "preprocessor_config.json"):
            if not (d / name).exists():
                raise FileNotFoundError(f"{d} has no {name}")
        image_cfg = ImageConfig.from_hf(json.loads((d / "preprocessor_config.json").read_text()))
        model_cfg = Qwen3VLConfig.from_dir(d) if (d / "config.json").exists() else None
        return cls(Tokenizer.from_file(str(d / "tokenizer.json")), image_cfg, model_cfg, ChatTemplate.from_dir(d),
                   reasoning=reasoning, template_kwargs=template_kwargs)

    # -- text ---------------------------------------------------------------------------------
    def format_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The chat as prompt text. ``content`` is a string or a list of ``{"type": "text", "text": ...}``
        / ``{"type": "image"}`` items (the image itself is passed separately, in order).

        With a chat template: its rendering, exactly as transformers' ``apply_chat_template`` (with
        ``self.template_kwargs``). With ``add_generation_prompt``, a generation prompt that leaves a
        ``<think>`` block open is closed empty (``reasoning="close"``: ``<think>\n\n</think>\n\n``, the
        model's non-thinking form, so an answer prefix or a choice score follows the closed block)
        or is a ValueError (``"refuse"``); see `ChatTemplate.prompt`. Without a template: the
        built-in Qwen ``<|im_start|>role\n...<|im_end|>\n`` format."""
        if self.chat_template is not None:
            if add_generation_prompt:
                return self.chat_template.prompt(messages, reasoning=self.reasoning, **self.template_kwargs)
            return self.chat_template.render(messages, False, **self.template_kwargs)
        return self._format_builtin(messages, add_generation_prompt)

    def _format_builtin(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
        """The hand-written Qwen chat format, for snapshots without a chat template."""
        out = []
        for msg in messages:
            content = msg["content"]
            if isinstance(content, str):
                body = content
            else:
                parts = []
                for item in content:
                    if item.get("type") == "image" or "image" in item:
                        parts.append(self.VSTART + self.IMAGE + self.VEND)
                    elif item.get("type") == "text":
                        parts.append(item["text"])
                    else:
                        raise ValueError(f"unsupported content item {item!r}")
                body = "".join(parts)
            out.append(f"{self.IM_START}{msg['role']}\n{body}{self.IM_END}\n")
        if add_generation_prompt:
            out.append(f"{self.IM_START}assistant\n")
        return "".join(out)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def token_id(self, text: str) -> int:
        """The id of a string that must be exactly one token (e.g. a judge's answer ``"1"``)."""
        ids = self.tokenize(text)
        if len(ids) != 1:
            raise ValueError(f"{text!r} is {len(ids)} tokens {ids}, not one")
        return ids[0]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    # -- prompts --------------------------------------------------------------------------------
    def encode(self, text: str, images: Sequence[Any] = ()) -> tuple[list[int], np.ndarray, np.ndarray]:
        """Tokenise ``text`` (one image placeholder per image) and expand each placeholder to the
        image's token count. Returns ``(ids, patches (N, patch_dim), grid_thw (n_images, 3))``."""
        ids = self.tokenize(text)
        slots = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(slots) != len(images):
            raise ValueError(f"the prompt has {len(slots)} image placeholders but {len(images)} images were given")
        pats, grids = [], []
        for k, img in enumerate(images, 1):
            try:
                p, g = preprocess_image(img, self.image_cfg)
            except ValueError as e:  # ImageDecodeError too: name the image
                raise ImageDecodeError(f"image {k} of {len(images)}: {e}") from None
            pats.append(p)
            grids.append(g)
        merge = self.image_cfg.merge_size ** 2
        out: list[int] = []
        j = 0
        for t in ids:
            if t == self.image_token_id:
                out.extend([t] * (int(np.prod(grids[j])) // merge))
                j += 1
            else:
                out.append(t)
        dim = 3 * self.image_cfg.temporal_patch_size * self.image_cfg.patch_size ** 2
        patches = np.concatenate(pats) if pats else np.zeros((0, dim), np.float32)
        return out, patches, np.asarray(grids, np.int64).reshape(-1, 3)

    def __call__(self, chats: Sequence[tuple[Sequence[dict[str, Any]], Sequence[Any]]], *,
                 seq_bucket: int | None = 64, patch_bucket: int | None = 256, image_bucket: int | None = 2,
                 add_generation_prompt: bool = True, assistant_prefix: str = "",
                 max_length: int | None = None, limit_note: str = "",
                 names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """A left-padded batch for the model from ``[(messages, images), ...]``.

        ``assistant_prefix`` is appended after the generation prompt (the start of the answer, e.g.
        ``'{"rank": ['`` to score the next token). A chat longer than ``max_length`` tokens (default:
        the text config's ``max_position_embeddings``) is a ValueError naming it, its length and
        the limit (``limit_note`` says where the limit comes from); ``names`` label the chats in
        such errors and in image decoding errors (default "chat <index>"). Every error about one
        chat is an `arr_jax.judge.base.InputError` (a ValueError) naming it, with ``index`` its
        position in ``chats`` and ``kind`` "bad_image" (an image that cannot be decoded or used),
        "too_long" or "input_error", so a caller can drop that chat and process the others.

        Returns the dict of `arr_jax.models.qwen3_vl.prepare_inputs` (``input_ids``,
        ``attention_mask``, ``positions``, image arrays ...), padded to the buckets.
        """
        if self.model_cfg is None:
            raise ValueError("the processor needs the model config (build it with from_dir on a snapshot)")
        if max_length is None:
            max_length = self.model_cfg.text.max_position_embeddings
            limit_note = limit_note or "the text config's max_position_embeddings"
        seqs, pats, grids = [], [], []
        for i, (messages, images) in enumerate(chats):
            name = names[i] if names is not None else f"chat {i}"
            text = self.format_chat(messages, add_generation_prompt) + assistant_prefix  # its errors: no one chat's
            try:
                ids, p, g = self.encode(text, images)
            except ImageDecodeError as e:
                raise InputError(f"{name}: {e}", index=i, kind=parsing.BAD_IMAGE) from None
            except ValueError as e:
                raise InputError(f"{name}: {e}", index=i) from None
            if len(ids) > max_length:
                n_img = sum(t == self.image_token_id for t in ids)
                raise InputError(f"prompt too long: {name} is {len(ids)} tokens ({n_img} of them image tokens, "
                                 f"{len(images)} images), more than the limit of {max_length}"
                                 + (f" ({limit_note})" if limit_note else ""), index=i, kind=parsing.TOO_LONG)
            seqs.append(ids)
            pats.append(p)
            grids.append(g)
        length = _round_up(max(len(s) for s in seqs), seq_bucket)
        ids, mask = left_pad(seqs, self.pad_id, length)
        grid = np.concatenate(grids)
        if not len(grid):
            return prepare_inputs(self.model_cfg, ids, mask)
        pv = np.concatenate(pats)
        return prepare_inputs(self.model_cfg, ids, mask, pv, grid, patch_bucket=patch_bucket,
                              image_bucket=image_bucket)
