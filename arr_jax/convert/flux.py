"""diffusers ``FluxTransformer2DModel`` checkpoint -> `arr_jax.models.flux.FluxTransformer`.

Our module tree mirrors diffusers' names, so the table is an identity on the dotted path
except for the leaf: a Linear's ``weight`` (out, in) becomes our ``kernel`` (in, out); an
RMSNorm's ``weight`` stays ``weight``. Numeric path parts become list indices.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arr_jax.convert.safetensors_io import SafetensorsCheckpoint, load_into_model
from arr_jax.models.flux import FluxConfig, FluxTransformer
from arr_jax.nn.lora import LoRAConfig, LoRAParam, apply_lora
from arr_jax.nn.stack import stack_blocks
from arr_jax.sharding import ShardingRules, param_shardings

# Leaves that are 1-D learned scales (kept as ``weight``, no transpose).
_NORM_WEIGHT = re.compile(r"\.(norm_q|norm_k|norm_added_q|norm_added_k)\.weight$")


def _transpose(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def diffusers_key_to_ours(key: str) -> tuple[tuple[str | int, ...], Callable[[np.ndarray], np.ndarray] | None]:
    """Map one diffusers state-dict key to (our path, transform).

    ``transformer_blocks.0.attn.to_q.weight`` -> (("transformer_blocks", 0, "attn", "to_q", "kernel"), transpose)
    ``transformer_blocks.0.attn.norm_q.weight`` -> (("transformer_blocks", 0, "attn", "norm_q", "weight"), None)
    ``proj_out.bias`` -> (("proj_out", "bias"), None)
    """
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.split(".")]
    if parts[-1] == "weight" and not _NORM_WEIGHT.search(key):
        return tuple(parts[:-1]) + ("kernel",), _transpose
    return tuple(parts), None


def _dtype(d: Any) -> Any:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(d, d) \
        if isinstance(d, str) else d


def load_flux_transformer(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = None,
                          rules: ShardingRules | None = None, lora: LoRAConfig | None = None,
                          lora_seed: int = 0, **config_overrides) -> FluxTransformer:
    """Load a diffusers ``transformer/`` directory (config.json + model.safetensors or shards+index).

    Args:
      model_dir: the ``transformer`` folder of a Flux snapshot (or any folder with those files).
      dtype: compute dtype; ``param_dtype`` (default: ``dtype``) is the storage dtype of weights.
      rules: sharding rules with a mesh -- weights go straight onto their shards.
      lora: attach fresh adapters (A random with ``lora_seed``, B zero) after loading.
      config_overrides: other `FluxConfig` fields (e.g. ``attention_impl``, ``remat``).

    Every checkpoint key must map onto a parameter of the right shape and every base
    parameter must be filled; otherwise a `CheckpointFormatError` names the keys.
    """
    dtype = _dtype(dtype)
    param_dtype = _dtype(param_dtype) if param_dtype is not None else dtype
    config = FluxConfig.from_diffusers_config(model_dir, dtype=dtype, param_dtype=param_dtype, lora=lora,
                                              **config_overrides)
    if config.patch_size != 1:
        raise ValueError(f"only patch_size=1 Flux checkpoints are supported, got {config.patch_size}")
    checkpoint = SafetensorsCheckpoint(model_dir)
    model = nnx.eval_shape(lambda: FluxTransformer(config, rngs=nnx.Rngs(lora_seed), rules=rules))
    shardings = None
    if rules is not None and rules.mesh is not None:
        shardings = param_shardings(nnx.state(model), rules)
    load_into_model(model, checkpoint, diffusers_key_to_ours, shardings=shardings)
    if lora is not None:
        _init_lora(model, config, lora_seed, rules)
    return model


def _init_lora(model: FluxTransformer, config: FluxConfig, seed: int, rules: ShardingRules | None) -> None:
    """Materialise the (abstract) LoRA adapters of ``model``: A drawn from ``Rngs(seed)``, B = 0.

    Only the adapters are computed (in one small jit), placed directly on their shards.
    """

    def make():  # adapters drawn per block as in the unstacked model, then stacked like the model's blocks
        fresh = nnx.eval_shape(lambda: FluxTransformer(config.replace(lora=None, scan_blocks=False), rngs=nnx.Rngs(0)))
        apply_lora(fresh, config.lora, rngs=nnx.Rngs(seed))
        if config.scan_blocks:
            fresh.transformer_blocks = stack_blocks(fresh.transformer_blocks)
            fresh.single_transformer_blocks = stack_blocks(fresh.single_transformer_blocks)
        return nnx.state(fresh, LoRAParam)

    out_shardings = None
    if rules is not None and rules.mesh is not None:
        out_shardings = param_shardings(nnx.state(model, LoRAParam), rules)
    nnx.update(model, jax.jit(make, out_shardings=out_shardings)())
