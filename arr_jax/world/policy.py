"""The demo's base policy: a tiny Flux transformer in pixel space + the world text encoder.

Same transformer class, SDE and RPO code as FLUX.1-dev; only the "VAE" (pixel patchify) and
the text stack (`WorldTextEncoder` instead of T5 + CLIP) differ. This module builds both
from an ml_collections config, provides the pure functions RPO needs (encode / apply /
decode), and saves/loads the small base checkpoint (a safetensors file + JSON).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arr_jax.diffusion import pixels
from arr_jax.models.flux import FluxConfig, FluxTransformer
from arr_jax.models.world_text import WorldTextConfig, WorldTextEncoder
from arr_jax.nn.lora import LoRAConfig
from arr_jax.world import spec


def flux_config(m, lora: LoRAConfig | None = None) -> FluxConfig:
    """FluxConfig of the pixel-space policy from the ``model`` config section."""
    p = m.patch_size
    return FluxConfig(in_channels=3 * p * p, num_layers=m.num_layers, num_single_layers=m.num_single_layers,
                      attention_head_dim=m.head_dim, num_attention_heads=m.heads,
                      joint_attention_dim=m.text_dim, pooled_projection_dim=m.pooled_dim,
                      guidance_embeds=False, axes_dims_rope=tuple(m.rope_dims), rope_theta=m.rope_theta,
                      lora=lora)


def text_config(m) -> WorldTextConfig:
    return WorldTextConfig(vocab_size=len(spec.VOCAB), max_len=m.max_tokens, width=m.text_width,
                           heads=m.text_heads, layers=m.text_layers, out_dim=m.text_dim, pooled_dim=m.pooled_dim)


class WorldPolicy(nnx.Module):
    """Flux (``flux``) + text encoder (``text``). Pretrained jointly; RPO trains ``flux`` only."""

    def __init__(self, m, *, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
        self.flux = FluxTransformer(flux_config(m, lora), rngs=rngs)
        self.text = WorldTextEncoder(text_config(m), rngs=rngs)


SIGMA_MIN = 0.05  # clip of sigma in the x0 → velocity conversion


@dataclasses.dataclass(frozen=True)
class PixelSpace:
    """Pure functions mapping the policy to RPO's interface for ``size``² RGB images."""

    size: int
    patch: int
    max_tokens: int

    @property
    def latent_shape(self) -> tuple[int, int]:
        return ((self.size // self.patch) ** 2, 3 * self.patch * self.patch)

    def ids(self):
        return jnp.asarray(pixels.image_ids(self.size, self.size, self.patch)), jnp.zeros((self.max_tokens, 3))

    def apply(self, flux: FluxTransformer, x, t, cond):
        """x (B, N, C) packed pixels at noise level t (B,) → velocity (B, N, C).

        The network predicts the clean image (x0-prediction), turned into the velocity that the
        SDE/ODE code expects: ``v = (x - x0) / sigma``. In pixel space a token (8·8·3 = 192
        values) is wider than the residual stream (128), so a network asked for ``v = noise - x0``
        would have to carry the noise through a bottleneck; clean images are low-dimensional and
        pass easily (as in "Back to Basics: Let Denoising Generative Models Denoise", 2025).
        """
        img_ids, txt_ids = self.ids()
        x0 = flux(x, cond["txt"], cond["pooled"], t, img_ids, txt_ids).astype(jnp.float32)
        sigma = jnp.maximum(t.astype(jnp.float32), SIGMA_MIN)[:, None, None]
        return (x.astype(jnp.float32) - x0) / sigma

    def decode(self, x0):
        """Packed pixel tokens → uint8 (B, H, W, 3)."""
        return pixels.to_uint8(pixels.unpatchify(x0, self.patch, self.size, self.size))

    def encode_images(self, images_uint8):
        return pixels.patchify(pixels.from_uint8(images_uint8), self.patch)


class PromptEncoder:
    """Caches text embeddings per prompt string (the text encoder is frozen during RPO)."""

    def __init__(self, text: WorldTextEncoder, max_tokens: int):
        graphdef, state = nnx.split(text)
        self.max_tokens = max_tokens
        self._fn = jax.jit(lambda st, tok: nnx.merge(graphdef, st)(tok))
        self._state = state
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, prompts: Sequence[str]) -> dict:
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            tok, _ = spec.tokenize(missing, self.max_tokens)
            txt, pooled = jax.device_get(self._fn(self._state, jnp.asarray(tok)))
            for i, p in enumerate(missing):
                self._cache[p] = (txt[i], pooled[i])
        return {"txt": jnp.asarray(np.stack([self._cache[p][0] for p in prompts])),
                "pooled": jnp.asarray(np.stack([self._cache[p][1] for p in prompts]))}


# --- base checkpoint (small, committed) ---------------------------------------------------

def _flat(state) -> dict[str, np.ndarray]:
    from arr_jax.convert.safetensors_io import flat_params

    return {k: np.asarray(v.get_value() if hasattr(v, "get_value") else v) for k, v in flat_params(state).items()}


def save_base(policy: WorldPolicy, path: str | Path, info: dict[str, Any]) -> None:
    """Write ``path`` (.safetensors, base params only, float32) and ``path.json`` (config, seed, metrics)."""
    from safetensors.numpy import save_file

    from arr_jax.nn_filters import base_param_filter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = _flat(nnx.state(policy, base_param_filter()))
    save_file(tensors, str(path))
    path.with_suffix(".json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str))


def load_base(policy: WorldPolicy, path: str | Path) -> dict:
    """Load a `save_base` file into ``policy`` (LoRA adapters untouched); returns its JSON info."""
    from arr_jax.convert.safetensors_io import SafetensorsCheckpoint, load_into_model

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no base policy checkpoint at {path}; run `python -m arr_jax.pretrain` to make one")
    ckpt = SafetensorsCheckpoint(path)
    load_into_model(policy, ckpt, lambda k: (tuple(int(p) if p.isdigit() else p for p in k.split(".")), None))
    info_path = path.with_suffix(".json")
    return json.loads(info_path.read_text()) if info_path.exists() else {}
