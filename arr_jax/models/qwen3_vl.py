"""Qwen3-VL for conditional generation in Flax NNX: vision encoder + language model + lm_head.

Module tree (mirrors Hugging Face): ``model.visual`` (`Qwen3VLVisionModel`),
``model.language_model`` (`Qwen3VLTextModel`), ``lm_head`` (absent when the word embeddings
are tied; then the logits use ``embed_tokens``).

Host-side (numpy) preparation, done once per batch outside jit:
  * `get_rope_index`: the ``(3, B, S)`` multimodal positions (text runs advance all three axes
    together; an image of ``h x w`` merged tokens gets ``(t0, t0+row, t0+col)`` and the text after
    it resumes at ``t0 + max(h, w)``), and the per-row delta used for decoding positions;
  * `image_index`: for each token the row of the flat image-feature array it takes (``-1`` for
    text), i.e. the order of HF's ``masked_scatter``;
  * `prepare_inputs`: bundles those with `vision_aux` into a dict of arrays for `__call__`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arr_jax.models.qwen3_vl_text import Linear, Qwen3VLTextModel, TextConfig
from arr_jax.models.qwen3_vl_vision import Qwen3VLVisionModel, VisionConfig, pack_patches, vision_aux
from arr_jax.sharding import ShardingRules

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "Qwen3VLConfig":
        """From a parsed ``config.json``; any other ``model_type`` than ``qwen3_vl`` is an error."""
        mt = d.get("model_type")
        if mt != "qwen3_vl":
            raise ValueError(f"not a Qwen3-VL snapshot: config.json has model_type={mt!r} "
                             f"(architectures={d.get('architectures')}); expected 'qwen3_vl'")
        text = d.get("text_config") or {}
        tie = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        return cls(
            text=TextConfig.from_hf(text), vision=VisionConfig.from_hf(d.get("vision_config") or {}),
            image_token_id=d.get("image_token_id", 151655), video_token_id=d.get("video_token_id", 151656),
            vision_start_token_id=d.get("vision_start_token_id", 151652),
            vision_end_token_id=d.get("vision_end_token_id", 151653), tie_word_embeddings=bool(tie))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Qwen3VLConfig":
        path = Path(model_dir) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json in {model_dir}")
        return cls.from_hf(json.loads(path.read_text()))


class Qwen3VLModel(nnx.Module):
    """``model`` in HF: holds ``visual`` and ``language_model``."""

    def __init__(self, cfg: Qwen3VLConfig, *, dtype, rngs, rules):
        self.visual = Qwen3VLVisionModel(cfg.vision, dtype=dtype, rngs=rngs, rules=rules)
        self.language_model = Qwen3VLTextModel(cfg.text, dtype=dtype, rngs=rngs, rules=rules)


class Qwen3VLForConditionalGeneration(nnx.Module):
    def __init__(self, cfg: Qwen3VLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 rules: ShardingRules | None = None):
        self.cfg = cfg
        self.rules = rules
        self.model = Qwen3VLModel(cfg, dtype=dtype, rngs=rngs, rules=rules)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.text.hidden_size, cfg.text.vocab_size, axes=("embed", "vocab"), bias=False, dtype=dtype, rngs=rngs)

    # -- pieces ---------------------------------------------------------------------------
    def encode_images(self, pixel_values, pos_index, pos_weight, rope_pos, patch_len):
        """Packed patches ``(G, L, patch_dim)`` → image tokens ``(G*L/m^2, E)``, deepstack ``(K, G*L/m^2, E)``."""
        return self.model.visual(pixel_values, pos_index, pos_weight, rope_pos, patch_len)

    def embed(self, input_ids: Array, image_embeds: Array | None = None,
              image_index: Array | None = None) -> Array:
        """Token embeddings ``(B, S, E)`` with image features scattered at image tokens."""
        x = self.model.language_model.embed_tokens(input_ids)
        if image_embeds is not None:
            feat = jnp.take(image_embeds, jnp.maximum(image_index, 0), axis=0).astype(x.dtype)
            x = jnp.where((image_index >= 0)[..., None], feat, x)
        return x

    def logits(self, hidden: Array) -> Array:
        """Hidden ``(..., E)`` → float32 logits ``(..., V)``."""
        if self.lm_head is not None:
            out = self.lm_head(hidden)
        else:
            table = self.model.language_model.embed_tokens.embedding[...]
            out = jnp.einsum("...e,ve->...v", hidden.astype(table.dtype), table)
        return out.astype(jnp.float32)

    # -- full forward -----------------------------------------------------------------------
    def __call__(self, input_ids: Array, positions: Array, attention_mask: Array, *,
                 pixel_values: Array | None = None, pos_index=None, pos_weight=None, rope_pos=None,
                 patch_len=None, image_index: Array | None = None, last_only: bool = False) -> Array:
        """Cache-free forward (used for scoring and parity).

        input_ids ``(B, S)``, positions ``(3, B, S)``, attention_mask ``(B, S)`` (1 = real token,
        left padding), image arrays as from `prepare_inputs`. Returns float32 logits ``(B, S, V)``
        (``(B, V)`` for the last position when ``last_only``).
        """
        hidden = self.hidden_states(input_ids, positions, attention_mask, pixel_values=pixel_values,
                                    pos_index=pos_index, pos_weight=pos_weight, rope_pos=rope_pos,
                                    patch_len=patch_len, image_index=image_index, last_only=last_only)
        if last_only:
            hidden = hidden[:, -1]
        return self.logits(hidden)

    def hidden_states(self, input_ids, positions, attention_mask, *, pixel_values=None, pos_index=None,
                      pos_weight=None, rope_pos=None, patch_len=None, image_index=None,
                      cache_k=None, cache_v=None, cache_index=None, mask=None, last_only: bool = False):
        """Decoder output after the final norm ``(B, S, E)`` (plus caches when given).

        With ``last_only`` the output is the last position's ``(B, 1, E)``: the last layer's
        queries, attention output and MLP run there only (`Qwen3VLTextModel`), while the caches are
        still filled for every position."""
        image_embeds = deepstack = None
        if pixel_values is not None:
            image_embeds, deepstack = self.encode_images(pixel_values, pos_index, pos_weight, rope_pos, patch_len)
        x = self.embed(input_ids, image_embeds, image_index)
        if mask is None:
            s = input_ids.shape[1]
            causal = jnp.tril(jnp.ones((s, s), bool))
            mask = causal[None] & (attention_mask[:, None, :] > 0)
        lm = self.model.language_model
        out, ck, cv = lm(x, positions, mask, visual_index=image_index if deepstack is not None else None,
                         deepstack=deepstack, cache_k=cache_k, cache_v=cache_v, cache_index=cache_index,
                         last_only=last_only)
        if cache_k is None:
            return out
        return out, ck, cv


# ----------------------------------------------------------------------------- host-side inputs


def get_rope_index(input_ids: np.ndarray, attention_mask: np.ndarray | None, image_grid_thw,
                   image_token_id: int, spatial_merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Multimodal positions ``(3, B, S)`` int32 and deltas ``(B,)`` (next position = valid_len + delta).

    Each maximal run of ``image_token_id`` is one image, consuming the next row of
    ``image_grid_thw`` (in batch-then-sequence order). Padding positions get 0.
    """
    ids = np.asarray(input_ids)
    b, s = ids.shape
    am = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    grids = iter(np.asarray(image_grid_thw).reshape(-1, 3).tolist()) if image_grid_thw is not None else iter(())
    pos = np.zeros((3, b, s), np.int32)
    deltas = np.zeros((b,), np.int32)
    m = spatial_merge_size
    for r in range(b):
        keep = am[r].astype(bool)
        row = ids[r][keep]
        is_img = row == image_token_id
        chunks, cur, i = [], 0, 0
        while i < len(row):
            j = i
            while j < len(row) and is_img[j] == is_img[i]:
                j += 1
            if is_img[i]:
                try:
                    t, h, w = next(grids)
                except StopIteration:
                    raise ValueError("more image-token runs in input_ids than rows in image_grid_thw") from None
                gt, gh, gw = t, h // m, w // m
                if gt * gh * gw != j - i:
                    raise ValueError(f"image run of {j - i} tokens does not match grid {t}x{h}x{w} / merge {m}")
                tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
                chunks.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + cur)
                cur += max(gh, gw)
            else:
                chunks.append(np.broadcast_to(np.arange(j - i) + cur, (3, j - i)))
                cur += j - i
            i = j
        p = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int64)
        pos[:, r, keep] = p
        deltas[r] = (int(p.max()) + 1 if p.size else 0) - len(row)
    if next(grids, None) is not None:
        raise ValueError("image_grid_thw has more rows than image-token runs in input_ids")
    return pos, deltas


def image_index(input_ids: np.ndarray, image_token_id: int, tokens_per_frame: np.ndarray | None = None,
                row_len: int | None = None) -> np.ndarray:
    """``(B, S)`` int32: the image-feature row each image token takes, ``-1`` for text.

    Image tokens are matched to features in order over the flattened batch (HF's
    ``masked_scatter``). With the packed layout (frame ``g`` owns rows ``g*row_len ...``, of which the
    first ``tokens_per_frame[g]`` are real) the running index is mapped onto those rows.
    """
    ids = np.asarray(input_ids)
    is_img = (ids == image_token_id).reshape(-1)
    n = int(is_img.sum())
    if tokens_per_frame is None:
        rows = np.arange(n)
    else:
        rows = np.concatenate([g * row_len + np.arange(k) for g, k in enumerate(tokens_per_frame.tolist())]
                              + [np.zeros(0, np.int64)])
        if len(rows) != n:
            raise ValueError(f"{n} image tokens in the prompt but the images give {len(rows)}")
    idx = np.full(is_img.shape, -1, np.int64)
    idx[is_img] = rows
    return idx.reshape(ids.shape).astype(np.int32)


def prepare_inputs(cfg: Qwen3VLConfig, input_ids, attention_mask=None, pixel_values=None,
                   image_grid_thw=None, patch_bucket: int | None = None,
                   image_bucket: int | None = None) -> dict[str, np.ndarray]:
    """Numpy arrays for `Qwen3VLForConditionalGeneration.__call__` (keys match its arguments).

    ``pixel_values`` ``(N, patch_dim)`` and ``image_grid_thw`` ``(num_images, 3)`` in the HF
    processor layout; they are packed one frame per row (`pack_patches`), each row padded to a
    multiple of ``patch_bucket`` patches and the row count to a multiple of ``image_bucket``
    (static shapes under jit). Also returns ``rope_deltas`` ``(B,)`` for decoding.
    """
    ids = np.asarray(input_ids).astype(np.int32)
    am = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
    pos, deltas = get_rope_index(ids, am, image_grid_thw, cfg.image_token_id, cfg.vision.spatial_merge_size)
    out = {"input_ids": ids, "attention_mask": am, "positions": pos, "rope_deltas": deltas}
    if pixel_values is not None:
        merge = cfg.vision.spatial_merge_size ** 2
        n_tok = int((ids == cfg.image_token_id).sum())
        want = int(np.prod(np.asarray(image_grid_thw), axis=-1).sum()) // merge
        if n_tok != want:
            raise ValueError(f"{n_tok} image tokens in the prompt but image_grid_thw gives {want}")
        aux = vision_aux(image_grid_thw, cfg.vision, patch_bucket=patch_bucket, frame_bucket=image_bucket)
        pv = pack_patches(pixel_values, aux)
        row_len = aux["pos_index"].shape[1] // merge
        out.update(aux, pixel_values=pv,
                   image_index=image_index(ids, cfg.image_token_id, aux["patch_len"] // merge, row_len))
    return out


def model_kwargs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The subset of `prepare_inputs` output that `__call__` takes as keyword arguments."""
    keys = ("pixel_values", "pos_index", "pos_weight", "rope_pos", "patch_len", "image_index")
    return {k: inputs[k] for k in keys if k in inputs}
