"""Pixel space as the latent space of the demo policy: 2-D patchify/unpatchify and position ids.

FLUX packs 2×2 patches of VAE latents into tokens; here we pack ``p×p`` patches of RGB pixels,
so the same transformer and SDE code run with no VAE. ``decode`` maps tokens back to uint8.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def patchify(images: jnp.ndarray, p: int) -> jnp.ndarray:
    """(B, H, W, C) → (B, (H/p)*(W/p), p*p*C)."""
    B, H, W, C = images.shape
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by patch size {p}")
    x = images.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(tokens: jnp.ndarray, p: int, height: int, width: int, channels: int = 3) -> jnp.ndarray:
    """(B, N, p*p*C) → (B, H, W, C)."""
    B = tokens.shape[0]
    x = tokens.reshape(B, height // p, width // p, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, height, width, channels)


def image_ids(height: int, width: int, p: int) -> np.ndarray:
    """FLUX-style position ids (N, 3): (0, row, col) per token."""
    h, w = height // p, width // p
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def to_uint8(images: jnp.ndarray) -> jnp.ndarray:
    """[-1, 1] float → uint8."""
    return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def from_uint8(images) -> jnp.ndarray:
    """uint8 → [-1, 1] float32."""
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0
