"""Load Qwen-Image's ``text_encoder/`` (a Hugging Face Qwen2.5-VL snapshot) into `Qwen25VLEncoder`.

Our tree mirrors Hugging Face, so the key map only
  * accepts the transformers-4 layout (``visual.*``, ``model.layers.*``, ``model.embed_tokens``) that
    the Qwen-Image snapshots were saved with, and the transformers-5 layout (``model.visual.*``,
    ``model.language_model.*``);
  * turns a ``weight`` into our leaf: ``kernel`` (Linear, transposed to (in, out); the 3-D patch conv
    flattened to (C*T*P*P, hidden)), ``embedding`` (the token table) or ``weight`` (norms);
  * skips ``lm_head.weight`` on purpose: Qwen-Image reads hidden states, not logits.
Every other key must fill a parameter of the right shape, and every parameter must be filled.
"""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from arr_jax.convert.qwen3_vl import _linear_t, _normalise
from arr_jax.convert.safetensors_io import SafetensorsCheckpoint, flat_params, load_abstract
from arr_jax.models.qwen2_5_vl import Qwen25VLConfig, Qwen25VLEncoder
from arr_jax.sharding import ShardingRules


def make_key_map(cfg: Qwen25VLConfig):
    """``hf_key -> (path tuple, transform) | None`` for `load_into_model`."""
    names = set(flat_params(nnx.state(nnx.eval_shape(lambda: Qwen25VLEncoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)))

    def key_map(hf_key: str):
        k = _normalise(hf_key)
        if k == "lm_head.weight":
            return None
        stem, _, leaf = k.rpartition(".")
        if leaf == "weight":
            if f"{stem}.kernel" in names:
                return tuple(f"{stem}.kernel".split(".")), _linear_t
            if f"{stem}.embedding" in names:
                return tuple(f"{stem}.embedding".split(".")), None
        return tuple(int(p) if p.isdigit() else p for p in k.split(".")), None

    return key_map


def load_qwen2_5_vl(model_dir: str | Path, dtype=jnp.float32, rules: ShardingRules | None = None):
    """`Qwen25VLEncoder` from a local snapshot folder; returns ``(model, cfg)``.

    A config of another architecture, a missing/unused key or a shape mismatch raises an error
    naming the problem; with ``rules`` carrying a mesh every tensor goes straight to its shards.
    """
    model_dir = Path(model_dir)
    cfg = Qwen25VLConfig.from_dir(model_dir)
    ckpt = SafetensorsCheckpoint(model_dir)
    model = load_abstract(lambda: Qwen25VLEncoder(cfg, dtype=dtype, rngs=nnx.Rngs(0), rules=rules), ckpt,
                          make_key_map(cfg), rules)
    return model, cfg
