"""Load a local Hugging Face Qwen3-VL snapshot (config.json + sharded safetensors) into NNX.

Our module tree mirrors HF names, so the key map only
  * strips the ``.weight`` suffix onto our leaf name: ``kernel`` (Linear, transposed to
    ``(in, out)``; the 3-D patch conv is flattened to ``(C*T*P*P, hidden)``), ``embedding``
    (Embedding tables) or ``weight`` (norms);
  * accepts the older ``visual.*`` / ``model.layers.*`` prefixes of pre-5.x checkpoints;
  * drops ``lm_head.weight`` when the embeddings are tied (it then equals ``embed_tokens``).
Every other key must land on a parameter of the right shape, and every parameter must be
filled (`load_into_model` enforces both and names offending keys).
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arr_jax.convert.safetensors_io import SafetensorsCheckpoint, flat_params, load_into_model
from arr_jax.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from arr_jax.sharding import ShardingRules, param_shardings


def _normalise(hf_key: str) -> str:
    """Map legacy layouts onto the transformers-5 names."""
    if hf_key.startswith("visual."):
        return "model." + hf_key
    if hf_key.startswith("model.") and not hf_key.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + hf_key[len("model."):]
    return hf_key


def _linear_t(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.reshape(a.shape[0], -1).T)


def make_key_map(model, cfg: Qwen3VLConfig):
    """``hf_key -> (path tuple, transform) | None`` for `load_into_model`."""
    names = set(flat_params(nnx.state(model, nnx.Param)))

    def key_map(hf_key: str):
        k = _normalise(hf_key)
        if k == "lm_head.weight" and cfg.tie_word_embeddings:
            return None
        stem, _, leaf = k.rpartition(".")
        if leaf == "weight":
            if f"{stem}.kernel" in names:
                return tuple(f"{stem}.kernel".split(".")), _linear_t
            if f"{stem}.embedding" in names:
                return tuple(f"{stem}.embedding".split(".")), None
        return tuple(k.split(".")), None

    return key_map


def load_qwen3_vl(model_dir: str | Path, dtype=jnp.bfloat16, rules: ShardingRules | None = None):
    """Build `Qwen3VLForConditionalGeneration` from a local snapshot; returns ``(model, cfg)``.

    Parameters are created abstractly (``nnx.eval_shape``) and each tensor is placed straight onto
    its devices (sharded by ``rules`` when it has a mesh). A snapshot of another architecture, a
    missing/unused key, or a shape mismatch raises an error naming the problem.
    """
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{model_dir} has no config.json (is it a Hugging Face snapshot?)")
    cfg = Qwen3VLConfig.from_hf(json.loads(cfg_path.read_text()))
    ckpt = SafetensorsCheckpoint(model_dir)
    model = nnx.eval_shape(lambda: Qwen3VLForConditionalGeneration(cfg, dtype=dtype, rngs=nnx.Rngs(0), rules=rules))
    shardings = None
    if rules is not None and rules.mesh is not None:
        shardings = param_shardings(nnx.state(model, nnx.Param), rules)
    load_into_model(model, ckpt, make_key_map(model, cfg), shardings=shardings)
    _materialise_rest(model)
    return model, cfg


def _materialise_rest(model) -> None:
    """Non-Param leaves left abstract by ``eval_shape`` (none today) would break jit; fail loudly."""
    for name, leaf in flat_params(nnx.state(model)).items():
        value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
        if isinstance(value, jax.ShapeDtypeStruct):
            raise ValueError(f"variable {name} was not filled from the checkpoint")
