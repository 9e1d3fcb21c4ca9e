"""Qwen-Image prompt embeddings: Qwen2.5-VL hidden states of a templated prompt (with source images).

As the diffusers pipelines compute them (``_get_qwen_prompt_embeds``):

* the prompt goes into a chat template whose system turn describes the task (`TEMPLATES`);
  Qwen-Image-Edit puts one ``<|vision_start|><|image_pad|><|vision_end|>`` slot before the
  instruction, Edit-Plus (2509) one ``"Picture k: "`` slot per source image;
* the text encoder runs once (images through the vision tower, each image pad token expanded
  to its merged-token count), and the final-norm hidden states of the prompt's tokens are kept
  **minus the first** ``drop`` **tokens** (the system turn: 34 tokens for text-to-image, 64 for
  editing, in Qwen's tokenizer);
* text-to-image truncates the tokens to ``1024 + drop`` first and the states to ``max_sequence_length``.

Each prompt gives a ``(L_i, D)`` array; a batch is padded at the end to a common length with a
mask (the transformer ignores padded text keys, and text positions do not depend on padding).
Entries are cached per (prompt, source images) on disk and in memory (`PromptCache`).
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arr_jax.diffusion.flux_pipeline import PromptCache, PromptTruncationWarning
from arr_jax.models.qwen2_5_vl import model_kwargs, prepare_inputs

IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
_SYSTEM_EDIT = ("Describe the key features of the input image (color, shape, size, texture, objects, background), "
                "then explain how the user's text instruction should alter or modify the image. Generate a new image "
                "that meets the user's requirements while maintaining consistency with the original input where "
                "appropriate.")
_SYSTEM_T2I = ("Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
               "relationships of the objects and background:")
_CHAT = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
# kind -> (system prompt, tokens dropped from the front of the hidden states)
TEMPLATES = {"t2i": (_SYSTEM_T2I, 34), "edit": (_SYSTEM_EDIT, 64), "edit_plus": (_SYSTEM_EDIT, 64)}
MAX_SOURCES = {"t2i": 0, "edit": 1, "edit_plus": 3}  # Edit-2509's model card: 1 to 3 input images


def as_prompt_list(prompts, name: str = "prompts") -> list[str]:
    """Normalise a public ``prompts`` argument as diffusers' pipelines do: one string is one prompt;
    a list / tuple (or 1-d array) of strings is a batch. Anything else, or a non-string entry, raises
    TypeError naming it (a bare string is never split into characters)."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"{name} must be a string or a list of strings, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(p).__name__} ({p!r:.60})")
    if not prompts:
        raise ValueError(f"{name} is empty: give at least one prompt")
    return list(prompts)


def prompt_text(kind: str, prompt: str, n_images: int) -> str:
    """The full chat text the text encoder reads for ``prompt`` with ``n_images`` source images."""
    if kind not in TEMPLATES:
        raise ValueError(f"unknown Qwen-Image pipeline kind {kind!r}; use one of {sorted(TEMPLATES)}")
    if kind == "t2i":
        user = prompt
    elif kind == "edit":
        user = IMAGE_SLOT + prompt
    else:
        user = "".join(f"Picture {i + 1}: {IMAGE_SLOT}" for i in range(n_images)) + prompt
    return _CHAT.format(system=TEMPLATES[kind][0], user=user)


def _image_key(img: np.ndarray) -> str:
    a = np.ascontiguousarray(np.asarray(img, np.uint8))
    return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()[:24]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m if m else n


class QwenImagePromptEncoder:
    """Prompt (+ condition images) -> Qwen2.5-VL hidden states, cached.

    Args:
      snapshot: a `arr_jax.convert.qwen_image_snapshot.QwenImageSnapshot` (text encoder, processor).
      cache_dir: folder of the on-disk cache (None: memory only).
      drop: tokens dropped from the front (default: the template's, as diffusers hard-codes it).
      max_sequence_length: text-to-image keeps at most this many states (diffusers' default 512).
      seq_bucket / window_bucket: token count and vision windows rounded up (fewer compiled shapes).
    """

    def __init__(self, snapshot, *, cache_dir: str | Path | None = None, drop: int | None = None,
                 max_sequence_length: int = 512, max_text_tokens: int = 1024, seq_bucket: int = 64,
                 window_bucket: int = 8, encode_batch: int = 4):
        self.snap, self.kind = snapshot, snapshot.kind
        self.drop = TEMPLATES[self.kind][1] if drop is None else int(drop)
        self.max_sequence_length, self.max_text_tokens = max_sequence_length, max_text_tokens
        self.seq_bucket, self.window_bucket, self.encode_batch = seq_bucket, window_bucket, encode_batch
        dtype = snapshot.text_encoder.model.language_model.embed_tokens.embedding.get_value().dtype
        # the cache key's parts: encoder files, tokenizer, image preprocessing, dtype, kind (text_fingerprint),
        # the prompt template and its dropped prefix, and the length limits; the file adds prompt + source hashes
        fp = (snapshot.text_fingerprint(dtype) + f"/template{TEMPLATES[self.kind][0]!r}/drop{self.drop}"
              f"/max{max_sequence_length}/{max_text_tokens}")
        self.cache = PromptCache(cache_dir, hashlib.sha256(fp.encode()).hexdigest())
        self.stats = {"encoded": 0, "cache_hits": 0, "truncated": 0}
        self._graph = nnx.split(snapshot.text_encoder)

    def release(self) -> None:
        """Drop the text encoder (~15 GB of Qwen2.5-VL-7B in bf16); later prompts must come from the cache."""
        self._graph = None
        self.snap.text_encoder = None

    def __call__(self, prompts: Sequence[str], images: Sequence[Sequence[np.ndarray]] | None = None,
                 ) -> list[np.ndarray]:
        """``prompts`` (B) and per prompt its condition images (uint8 (H, W, 3), already at the condition
        size) -> B arrays (L_i, D). Raises ValueError for images given to text-to-image or missing for editing."""
        prompts = as_prompt_list(prompts)
        images = [list(x) for x in images] if images is not None else [[] for _ in prompts]
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts")
        for i, (p, ims) in enumerate(zip(prompts, images)):
            if self.kind == "t2i" and ims:
                raise ValueError(f"prompt {i} ({p[:60]!r}) has source images, but this is a text-to-image snapshot")
            if self.kind != "t2i" and not ims:
                raise ValueError(f"prompt {i} ({p[:60]!r}) has no source image; Qwen-Image-Edit needs one")
        keys = [p + "\0" + "\0".join(_image_key(im) for im in ims) for p, ims in zip(prompts, images)]
        found = {k: self.cache.get(k) for k in dict.fromkeys(keys)}
        missing = [k for k, e in found.items() if e is None]
        self.stats["cache_hits"] += len(keys) - len(missing)
        if missing and self._graph is None:
            raise RuntimeError(f"{len(missing)} prompt(s) are not in the embedding cache and the text encoder was "
                               f"released (first: {missing[0][:80]!r})")
        todo = {k: (p, ims) for k, p, ims in zip(keys, prompts, images) if k in missing}
        order = list(todo)
        for lo in range(0, len(order), self.encode_batch):
            chunk = order[lo:lo + self.encode_batch]
            for k, states in zip(chunk, self._encode([todo[k] for k in chunk])):
                found[k] = {"txt": states}
                self.cache.put(k, found[k])
            self.stats["encoded"] += len(chunk)
        return [found[k]["txt"] for k in keys]

    def state_lengths(self, prompts: Sequence[str], images: Sequence[Sequence[np.ndarray]] | None = None,
                      ) -> list[int]:
        """How many text states `__call__` gives each prompt (with its condition images, already at the
        condition size), from the tokenizer and image processor alone (no encoder pass; works after
        `release`): the templated tokens minus the dropped prefix (text-to-image: at most
        ``max_sequence_length``, after truncation to ``max_text_tokens``)."""
        prompts = as_prompt_list(prompts)
        images = [list(x) for x in images] if images is not None else [[] for _ in prompts]
        out = []
        for prompt, ims in zip(prompts, images):
            n = len(self.snap.processor.encode(prompt_text(self.kind, prompt, len(ims)), ims)[0]) - self.drop
            if self.kind == "t2i":
                n = min(n, self.max_text_tokens, self.max_sequence_length)
            out.append(n)
        return out

    def _encode(self, items: list[tuple[str, list[np.ndarray]]]) -> list[np.ndarray]:
        proc, cfg = self.snap.processor, self.snap.text_config
        seqs, pats, grids = [], [], []
        for prompt, ims in items:
            ids, p, g = proc.encode(prompt_text(self.kind, prompt, len(ims)), ims)
            if self.kind == "t2i" and len(ids) > self.max_text_tokens + self.drop:
                self.stats["truncated"] += 1
                warnings.warn(f"a prompt is {len(ids) - self.drop} tokens, more than the limit of "
                              f"{self.max_text_tokens}; truncated ({prompt[:80]!r}...)", PromptTruncationWarning,
                              stacklevel=3)
                ids = ids[: self.max_text_tokens + self.drop]
            if len(ids) <= self.drop:
                raise ValueError(f"the templated prompt is only {len(ids)} tokens, not more than the {self.drop} "
                                 f"dropped ({prompt[:60]!r})")
            seqs.append(ids)
            pats.append(p)
            grids.append(g)
        length = _round_up(max(len(s) for s in seqs), self.seq_bucket)
        ids = np.full((len(seqs), length), proc.pad_id, np.int32)
        mask = np.zeros((len(seqs), length), np.int32)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        grid = np.concatenate(grids) if any(len(g) for g in grids) else None
        pv = np.concatenate(pats) if grid is not None else None
        inp = prepare_inputs(cfg, ids, mask, pv, grid, window_bucket=self.window_bucket, image_bucket=2)
        hidden = np.asarray(jax.device_get(_encode_jit(self._graph[0], self._graph[1],
                                                       {k: jnp.asarray(v) for k, v in inp.items()})))
        out = []
        for i, s in enumerate(seqs):
            h = hidden[i, self.drop: len(s)]
            if self.kind == "t2i":
                h = h[: self.max_sequence_length]
            out.append(np.array(h))
        return out


def pad_states(states: Sequence[np.ndarray], length: int | None = None, bucket: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """B arrays (L_i, D) -> (txt (B, L, D), txt_mask (B, L) bool), zero-padded at the end to ``length``
    (default: the longest, rounded up to ``bucket``). Longer states than ``length`` are an error."""
    longest = max(s.shape[0] for s in states)
    length = _round_up(longest, bucket) if length is None else length
    if longest > length:
        raise ValueError(f"a prompt has {longest} text states, more than the padded length {length}")
    d = states[0].shape[1]
    txt = np.zeros((len(states), length, d), states[0].dtype)
    mask = np.zeros((len(states), length), bool)
    for i, s in enumerate(states):
        txt[i, : s.shape[0]], mask[i, : s.shape[0]] = s, True
    return txt, mask


def _encode(graphdef, state, inp: dict[str, Any]):
    model = nnx.merge(graphdef, state)
    return model(inp["input_ids"], inp["positions"], inp["attention_mask"], **model_kwargs(inp))


_encode_jit = jax.jit(_encode, static_argnums=(0,))
