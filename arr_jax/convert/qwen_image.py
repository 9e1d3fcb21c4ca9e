"""diffusers ``QwenImageTransformer2DModel`` checkpoint -> `arr_jax.models.qwen_image.QwenImageTransformer`.

Our module tree mirrors diffusers' names, so the table is an identity on the dotted path except
for the leaf: a Linear's ``weight`` (out, in) becomes our ``kernel`` (in, out); an RMSNorm's
``weight`` (``txt_norm``, ``attn.norm_q`` ...) stays ``weight``. Numeric parts become list
indices (``img_mod.1`` is index 1 of ``[SiLU, Linear]``).
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from arr_jax.convert.safetensors_io import SafetensorsCheckpoint, load_into_model, weights_path
from arr_jax.models.qwen_image import QwenImageConfig, QwenImageTransformer
from arr_jax.nn.lora import LoRAConfig, LoRAParam, apply_lora
from arr_jax.nn.stack import stack_blocks
from arr_jax.sharding import ShardingRules, param_shardings

_NORM_WEIGHT = re.compile(r"(^txt_norm|\.(norm_q|norm_k|norm_added_q|norm_added_k))\.weight$")


def _transpose(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def qwen_image_key_map(key: str) -> tuple[tuple[str | int, ...], Callable[[np.ndarray], np.ndarray] | None]:
    """One diffusers key -> (our path, transform).

    ``transformer_blocks.0.img_mod.1.weight`` -> (("transformer_blocks", 0, "img_mod", 1, "kernel"), transpose)
    ``transformer_blocks.0.attn.norm_q.weight`` -> (..., "norm_q", "weight"), None)
    """
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.split(".")]
    if parts[-1] == "weight" and not _NORM_WEIGHT.search(key):
        return tuple(parts[:-1]) + ("kernel",), _transpose
    return tuple(parts), None


def _dtype(d: Any) -> Any:
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(d, d) \
        if isinstance(d, str) else d


def load_qwen_image_transformer(model_dir: str | os.PathLike, *, dtype: Any = "float32", param_dtype: Any = None,
                                rules: ShardingRules | None = None, lora: LoRAConfig | None = None,
                                lora_seed: int = 0, **config_overrides) -> QwenImageTransformer:
    """Load a diffusers ``transformer/`` folder (config.json + safetensors, single file or shards + index).

    Args:
      model_dir: the ``transformer`` folder of a Qwen-Image / Qwen-Image-Edit(-2509) snapshot.
      dtype: compute dtype; ``param_dtype`` (default: ``dtype``) is the storage dtype of the weights.
      rules: sharding rules with a mesh: weights go straight onto their shards.
      lora: attach fresh adapters (A random with ``lora_seed``, B zero) after loading.
      config_overrides: other `QwenImageConfig` fields (``attention_impl``, ``remat``).

    Every checkpoint key must map onto a parameter of the right shape and every base parameter
    must be filled; otherwise a `CheckpointFormatError` names the keys. A config of another
    model class is a ValueError naming the file.
    """
    dtype = _dtype(dtype)
    param_dtype = _dtype(param_dtype) if param_dtype is not None else dtype
    config = QwenImageConfig.from_diffusers_config(model_dir, dtype=dtype, param_dtype=param_dtype, lora=lora,
                                                   **config_overrides)
    checkpoint = SafetensorsCheckpoint(weights_path(model_dir, "diffusion_pytorch_model"))
    model = nnx.eval_shape(lambda: QwenImageTransformer(config, rngs=nnx.Rngs(lora_seed), rules=rules))
    shardings = None
    if rules is not None and rules.mesh is not None:
        shardings = param_shardings(nnx.state(model), rules)
    load_into_model(model, checkpoint, qwen_image_key_map, shardings=shardings)
    if lora is not None:
        _init_lora(model, config, lora_seed, rules)
    return model


def _init_lora(model: QwenImageTransformer, config: QwenImageConfig, seed: int, rules: ShardingRules | None) -> None:
    """Materialise the abstract LoRA adapters: A from ``Rngs(seed)``, B = 0, placed on their shards."""

    def make():  # adapters drawn per block as in the unstacked model, then stacked like the model's blocks
        fresh = nnx.eval_shape(lambda: QwenImageTransformer(config.replace(lora=None, scan_blocks=False),
                                                            rngs=nnx.Rngs(0)))
        apply_lora(fresh, config.lora, rngs=nnx.Rngs(seed))
        if config.scan_blocks:
            fresh.transformer_blocks = stack_blocks(fresh.transformer_blocks)
        return nnx.state(fresh, LoRAParam)

    out_shardings = None
    if rules is not None and rules.mesh is not None:
        out_shardings = param_shardings(nnx.state(model, LoRAParam), rules)
    nnx.update(model, jax.jit(make, out_shardings=out_shardings)())
