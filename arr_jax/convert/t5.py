"""transformers T5 encoder directory (config.json + model*.safetensors) -> our `T5Encoder`.

Names are kept, so the table is: Linear ``weight`` (O, I) -> ``kernel`` (I, O); embeddings
(``shared``, ``relative_attention_bias``) ``weight`` -> ``embedding``; layer norms unchanged.
``encoder.embed_tokens.weight`` is tied to ``shared.weight``: it is used only when ``shared`` is
absent. Decoder / LM-head tensors of a full T5 checkpoint are skipped, as ``T5EncoderModel`` does.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from arr_jax.convert.safetensors_io import SafetensorsCheckpoint, load_abstract, weights_path
from arr_jax.models.t5 import T5Encoder, T5EncoderConfig
from arr_jax.sharding import ShardingRules


def read_t5_config(path: str | Path) -> T5EncoderConfig:
    """Parse ``path/config.json``; a missing file or a non-T5 model is a clear error."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        hint = (" (pass the snapshot's text_encoder_2/ subfolder)"
                if (path / "text_encoder_2" / "config.json").exists() else "")
        raise FileNotFoundError(f"no T5 config at {cfg_file}{hint}")
    with open(cfg_file) as f:
        d = json.load(f)
    if d.get("model_type") != "t5":
        raise ValueError(f"{cfg_file}: expected model_type 't5' (T5EncoderModel), got {d.get('model_type')!r}")
    try:
        return T5EncoderConfig.from_dict(d)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{cfg_file}: {e}") from None



def make_t5_key_map(keys: set[str]):
    """Key map for a checkpoint holding ``keys``."""
    has_shared = "shared.weight" in keys

    def key_map(hf_key: str):
        if hf_key.startswith(("decoder.", "lm_head.")):
            return None
        if hf_key == "encoder.embed_tokens.weight":
            return None if has_shared else (("shared", "embedding"), None)
        parts = hf_key.split(".")
        path = tuple(int(p) if p.isdigit() else p for p in parts[:-1])
        if parts[-1] != "weight":
            return path + (parts[-1],), None
        if parts[-2] in ("shared", "relative_attention_bias"):
            return path + ("embedding",), None
        if parts[-2] in ("layer_norm", "final_layer_norm"):
            return path + ("weight",), None
        return path + ("kernel",), np.transpose

    return key_map


def load_t5_encoder(path: str | Path, dtype: Any = jnp.float32, rules: ShardingRules | None = None) -> T5Encoder:
    """Load a ``T5EncoderModel`` directory (e.g. FLUX's text_encoder_2/) into `T5Encoder`."""
    path = Path(path)
    cfg = read_t5_config(path)
    ckpt = SafetensorsCheckpoint(weights_path(path, "model"))
    return load_abstract(lambda: T5Encoder(cfg, dtype=dtype, rngs=nnx.Rngs(0), rules=rules), ckpt,
                         make_t5_key_map(set(ckpt.keys())), rules)
