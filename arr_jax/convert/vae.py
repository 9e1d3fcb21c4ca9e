"""diffusers ``AutoencoderKL`` directory (config.json + diffusion_pytorch_model.safetensors) -> our VAE.

Our module tree mirrors diffusers, so the table is: conv ``weight`` (O, I, kh, kw) -> ``kernel``
(kh, kw, I, O); linear ``weight`` (O, I) -> ``kernel`` (I, O); GroupNorm ``weight``/``bias`` and
every ``bias`` unchanged. Checkpoints written before diffusers renamed the attention layers
(``query``/``key``/``value``/``proj_attn``, sometimes as 1x1 convs) are accepted too.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from arr_jax.convert.safetensors_io import CheckpointFormatError, SafetensorsCheckpoint, load_abstract, weights_path
from arr_jax.models.vae import AutoencoderKL, VAEConfig
from arr_jax.sharding import ShardingRules

_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def read_vae_config(path: str | Path) -> VAEConfig:
    """Parse ``path/config.json`` of a diffusers AutoencoderKL; clear errors for anything else."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        hint = " (pass the snapshot's vae/ subfolder)" if (path / "vae" / "config.json").exists() else ""
        raise FileNotFoundError(f"no VAE config at {cfg_file}{hint}")
    with open(cfg_file) as f:
        d = json.load(f)
    if d.get("_class_name") != "AutoencoderKL":
        raise ValueError(f"{cfg_file}: expected _class_name 'AutoencoderKL', got {d.get('_class_name')!r}")
    try:
        return VAEConfig.from_dict(d)
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from None



def vae_key_map(hf_key: str):
    """diffusers key -> (our path, transform)."""
    parts = hf_key.split(".")
    leaf = parts[-1]
    if len(parts) >= 2 and parts[-2] in _OLD_ATTN and "attentions" in parts:
        parts = parts[:-2] + _OLD_ATTN[parts[-2]].split(".") + [leaf]
    path = tuple(int(p) if p.isdigit() else p for p in parts[:-1])
    module = parts[-2]
    if leaf == "bias":
        return path + ("bias",), None
    if leaf != "weight":
        return path + (leaf,), None
    if module in ("group_norm", "conv_norm_out") or module.startswith("norm"):
        return path + ("weight",), None
    if module in ("to_q", "to_k", "to_v") or parts[-3:-1] == ["to_out", "0"]:
        return path + ("kernel",), _linear_kernel
    return path + ("kernel",), _conv_kernel


def _linear_kernel(w: np.ndarray) -> np.ndarray:
    """(O, I) or a 1x1 conv (O, I, 1, 1) -> (I, O)."""
    if w.ndim == 4:
        w = w[:, :, 0, 0]
    return w.T


def _conv_kernel(w: np.ndarray) -> np.ndarray:
    """(O, I, kh, kw) -> (kh, kw, I, O)."""
    if w.ndim != 4:
        raise CheckpointFormatError(f"expected a 4-d conv weight, got shape {w.shape}")
    return w.transpose(2, 3, 1, 0)


def load_vae(path: str | Path, dtype: Any = jnp.float32, rules: ShardingRules | None = None) -> AutoencoderKL:
    """Load a diffusers AutoencoderKL directory into `AutoencoderKL` (params and compute in ``dtype``).

    With ``rules`` carrying a mesh, every tensor goes straight to its sharded devices.
    """
    cfg = read_vae_config(path)
    ckpt = SafetensorsCheckpoint(weights_path(path, "diffusion_pytorch_model"))
    return load_abstract(lambda: AutoencoderKL(cfg, dtype=dtype, rngs=nnx.Rngs(0), rules=rules), ckpt,
                         vae_key_map, rules)
