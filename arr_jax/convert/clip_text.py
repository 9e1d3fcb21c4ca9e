"""transformers ``CLIPTextModel`` directory (config.json + model.safetensors) -> our `CLIPTextModel`.

Names are kept, so the table is: Linear ``weight`` (O, I) -> ``kernel`` (I, O); embedding
``weight`` -> ``embedding``; layer norms unchanged. Checkpoints written by transformers < 5 (such
as FLUX's text_encoder/) prefix every key with ``text_model.``; that prefix is stripped. The
``position_ids`` buffer some of them carry is skipped (we recompute it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from arr_jax.convert.safetensors_io import SafetensorsCheckpoint, load_abstract, weights_path
from arr_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from arr_jax.sharding import ShardingRules


def read_clip_text_config(path: str | Path) -> CLIPTextConfig:
    """Parse ``path/config.json``; a missing file or another model type is a clear error."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        hint = (" (pass the snapshot's text_encoder/ subfolder)"
                if (path / "text_encoder" / "config.json").exists() else "")
        raise FileNotFoundError(f"no CLIP text config at {cfg_file}{hint}")
    with open(cfg_file) as f:
        d = json.load(f)
    if d.get("model_type") != "clip_text_model":
        raise ValueError(f"{cfg_file}: expected model_type 'clip_text_model' (CLIPTextModel), "
                         f"got {d.get('model_type')!r}")
    try:
        return CLIPTextConfig.from_dict(d)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{cfg_file}: {e}") from None



def clip_text_key_map(hf_key: str):
    """transformers key -> (our path, transform); None for the ``position_ids`` buffer."""
    key = hf_key.removeprefix("text_model.")
    if key.endswith("position_ids"):
        return None
    parts = key.split(".")
    path = tuple(int(p) if p.isdigit() else p for p in parts[:-1])
    if parts[-1] != "weight":
        return path + (parts[-1],), None
    if parts[-2] in ("token_embedding", "position_embedding"):
        return path + ("embedding",), None
    if parts[-2].startswith(("layer_norm", "final_layer_norm")):
        return path + ("weight",), None
    return path + ("kernel",), np.transpose


def load_clip_text(path: str | Path, dtype: Any = jnp.float32,
                   rules: ShardingRules | None = None) -> CLIPTextModel:
    """Load a ``CLIPTextModel`` directory (e.g. FLUX's text_encoder/) into `CLIPTextModel`."""
    path = Path(path)
    cfg = read_clip_text_config(path)
    ckpt = SafetensorsCheckpoint(weights_path(path, "model"))
    return load_abstract(lambda: CLIPTextModel(cfg, dtype=dtype, rngs=nnx.Rngs(0), rules=rules), ckpt,
                         clip_text_key_map, rules)
