"""Qwen2.5-VL as Qwen-Image's text encoder: vision tower + language model -> final hidden states.

Module tree (mirrors Hugging Face ``Qwen2_5_VLForConditionalGeneration``): ``model.visual``
(`Qwen25VLVisionModel`) and ``model.language_model`` (`Qwen25VLTextModel`). The ``lm_head`` is not
built: Qwen-Image reads the last hidden states, never logits (`arr_jax.convert.qwen2_5_vl` skips
that tensor on purpose).

Host-side preparation (numpy, outside jit), `prepare_inputs`:
  * multimodal positions ``(3, B, S)`` from Qwen3-VL's `get_rope_index` (the rule is the same:
    text advances all three axes, an image of ``h x w`` merged tokens at ``t0`` gets
    ``(t0, t0 + row, t0 + col)`` and the text after it resumes at ``t0 + max(h, w)``);
    note: diffusers 0.42 with transformers 5 drops ``mm_token_type_ids`` and so silently feeds
    sequential positions instead (diffusers issue #14194); we use the positions the model was
    trained with;
  * the vision layout (`vision_layout`) and, for every image token, its row in the vision output.
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

from arr_jax.models.qwen2_5_vl_text import Qwen25VLTextModel
from arr_jax.models.qwen2_5_vl_vision import Qwen25VisionConfig, Qwen25VLVisionModel, pack_vision_patches, vision_layout
from arr_jax.models.qwen3_vl import get_rope_index
from arr_jax.models.qwen3_vl_text import TextConfig
from arr_jax.sharding import ShardingRules

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    text: TextConfig = TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                  num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
                                  rope_theta=1_000_000.0, mrope_section=(16, 24, 24), attention_bias=True,
                                  max_position_embeddings=128000)
    vision: Qwen25VisionConfig = Qwen25VisionConfig()
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    @classmethod
    def from_hf(cls, d: dict[str, Any], where: str = "config.json") -> "Qwen25VLConfig":
        """From a parsed ``config.json`` (transformers 4.x flat text fields or 5.x ``text_config``)."""
        mt = d.get("model_type")
        if mt != "qwen2_5_vl":
            raise ValueError(f"{where}: model_type={mt!r} (architectures={d.get('architectures')}) is not a "
                             f"Qwen2.5-VL text encoder; expected 'qwen2_5_vl'")
        text = dict(d.get("text_config") or d)
        rope = dict(text.get("rope_scaling") or {})
        rope.update(text.get("rope_parameters") or {})
        rope.setdefault("mrope_section", [16, 24, 24])
        text["rope_parameters"] = rope
        text.pop("rope_scaling", None)
        if text.get("use_sliding_window"):
            raise NotImplementedError(f"{where}: use_sliding_window=true is not supported")
        return cls(text=TextConfig.from_hf(text), vision=Qwen25VisionConfig.from_hf(d.get("vision_config") or {}),
                   image_token_id=d.get("image_token_id", 151655),
                   vision_start_token_id=d.get("vision_start_token_id", 151652),
                   vision_end_token_id=d.get("vision_end_token_id", 151653))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Qwen25VLConfig":
        path = Path(model_dir) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json in {model_dir}")
        return cls.from_hf(json.loads(path.read_text()), str(path))


class Qwen25VLModel(nnx.Module):
    """``model`` in HF: holds ``visual`` and ``language_model``."""

    def __init__(self, cfg: Qwen25VLConfig, *, dtype, rngs, rules):
        self.visual = Qwen25VLVisionModel(cfg.vision, dtype=dtype, rngs=rngs, rules=rules)
        self.language_model = Qwen25VLTextModel(cfg.text, dtype=dtype, rngs=rngs, rules=rules)


class Qwen25VLEncoder(nnx.Module):
    """Qwen2.5-VL without the LM head: `__call__` gives the final hidden states."""

    def __init__(self, cfg: Qwen25VLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 rules: ShardingRules | None = None):
        self.cfg, self.rules = cfg, rules
        self.model = Qwen25VLModel(cfg, dtype=dtype, rngs=rngs, rules=rules)

    def __call__(self, input_ids: Array, positions: Array, attention_mask: Array, *,
                 pixel_values: Array | None = None, rope_pos: Array | None = None, valid: Array | None = None,
                 image_index: Array | None = None) -> Array:
        """Final-norm hidden states (B, S, E).

        input_ids (B, S) int32, positions (3, B, S), attention_mask (B, S) (1 = token, 0 = padding;
        either side); the image arrays come from `prepare_inputs` (``image_index`` (B, S): the row of
        the vision output each image token takes, -1 for text).
        """
        x = self.model.language_model.embed_tokens(input_ids)
        if pixel_values is not None:
            feats = self.model.visual(pixel_values, rope_pos, valid)
            take = jnp.take(feats, jnp.maximum(image_index, 0), axis=0).astype(x.dtype)
            x = jnp.where((image_index >= 0)[..., None], take, x)
        s = input_ids.shape[1]
        mask = jnp.tril(jnp.ones((s, s), bool))[None] & (attention_mask[:, None, :] > 0)
        return self.model.language_model(x, positions, mask)


def prepare_inputs(cfg: Qwen25VLConfig, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                   window_bucket: int | None = None, image_bucket: int | None = None) -> dict[str, np.ndarray]:
    """Numpy arguments of `Qwen25VLEncoder.__call__` (keys match its parameter names).

    ``pixel_values`` (N, patch_dim) and ``image_grid_thw`` (n_images, 3) in the processor layout;
    images are matched to image-token runs in batch-then-sequence order. ``window_bucket`` /
    ``image_bucket`` round the vision shapes up (see `vision_layout`) so shapes stay static.
    """
    ids = np.asarray(input_ids).astype(np.int32)
    am = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
    pos, _ = get_rope_index(ids, am, image_grid_thw, cfg.image_token_id, cfg.vision.spatial_merge_size)
    out = {"input_ids": ids, "attention_mask": am, "positions": pos}
    if pixel_values is None:
        return out
    layout = vision_layout(image_grid_thw, cfg.vision, window_bucket=window_bucket, image_bucket=image_bucket)
    is_img = (ids == cfg.image_token_id) & (am > 0)
    rows = layout["token_rows"]
    if int(is_img.sum()) != len(rows):
        raise ValueError(f"{int(is_img.sum())} image tokens in the prompts but the images give {len(rows)}")
    index = np.full(ids.shape, -1, np.int32)
    index[is_img] = rows
    out.update(pixel_values=pack_vision_patches(pixel_values, layout), rope_pos=layout["rope_pos"],
               valid=layout["valid"], image_index=index)
    return out


def model_kwargs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The keyword-argument subset of `prepare_inputs`' output."""
    return {k: inputs[k] for k in ("pixel_values", "rope_pos", "valid", "image_index") if k in inputs}
