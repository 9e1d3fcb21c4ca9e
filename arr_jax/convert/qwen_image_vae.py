"""diffusers ``AutoencoderKLQwenImage`` folder (config.json + safetensors) -> `QwenImageVAE` (still images).

The table (our tree mirrors diffusers):
  * causal 3-D conv ``weight`` (O, I, kt, kh, kw) -> ``kernel`` (kh, kw, I, O) = its LAST temporal tap,
    the only one a single frame meets after the causal zero padding (see `arr_jax.models.qwen_image_vae`);
  * 2-D conv ``weight`` (O, I, kh, kw) (resamplers, attention 1x1s) -> ``kernel`` (kh, kw, I, O);
  * RMS-norm ``gamma`` (C, 1, 1[, 1]) -> ``gamma`` (C,); every ``bias`` unchanged;
  * ``*.time_conv.*`` (temporal up/down-sampling, skipped by the reference on a first frame) are
    deliberately not loaded.
Every other key must fill a parameter of the right shape, and every parameter must be filled.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from arr_jax.convert.safetensors_io import CheckpointFormatError, SafetensorsCheckpoint, load_abstract, weights_path
from arr_jax.models.qwen_image_vae import QwenImageVAE, QwenImageVAEConfig
from arr_jax.sharding import ShardingRules


def read_qwen_vae_config(path: str | Path) -> QwenImageVAEConfig:
    """Parse ``path/config.json``; a missing file or another VAE class is an error naming the file."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"no VAE config at {cfg_file}")
    try:
        return QwenImageVAEConfig.from_dict(json.loads(cfg_file.read_text()))
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from None


def _conv(w: np.ndarray) -> np.ndarray:
    """(O, I, kt, kh, kw) -> last tap (kh, kw, I, O); (O, I, kh, kw) -> (kh, kw, I, O)."""
    if w.ndim == 5:
        w = w[:, :, -1]
    if w.ndim != 4:
        raise CheckpointFormatError(f"expected a 4-d or 5-d conv weight, got shape {w.shape}")
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _gamma(w: np.ndarray) -> np.ndarray:
    return w.reshape(-1)


def qwen_vae_key_map(hf_key: str):
    """diffusers key -> (our path, transform), or None for the temporal ``time_conv`` weights."""
    parts = hf_key.split(".")
    if "time_conv" in parts:
        return None
    path = tuple(int(p) if p.isdigit() else p for p in parts[:-1])
    leaf = parts[-1]
    if leaf == "gamma":
        return path + ("gamma",), _gamma
    if leaf == "weight":
        return path + ("kernel",), _conv
    return path + (leaf,), None


def load_qwen_image_vae(path: str | Path, dtype: Any = jnp.float32, rules: ShardingRules | None = None) -> QwenImageVAE:
    """Load a diffusers ``vae/`` folder of a Qwen-Image snapshot (params and compute in ``dtype``).

    With ``rules`` carrying a mesh, every tensor goes straight to its devices.
    """
    cfg = read_qwen_vae_config(path)
    ckpt = SafetensorsCheckpoint(weights_path(path, "diffusion_pytorch_model"))
    return load_abstract(lambda: QwenImageVAE(cfg, dtype=dtype, rngs=nnx.Rngs(0), rules=rules), ckpt,
                         qwen_vae_key_map, rules)
