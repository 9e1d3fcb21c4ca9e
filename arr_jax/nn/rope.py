"""Multi-axis rotary position embeddings (Flux's 3-axis RoPE), float32 math.

Flux splits each head's ``head_dim`` into per-axis chunks (e.g. 16+56+56 for the
(index, row, col) ids). Within a chunk, consecutive pairs ``(x[2i], x[2i+1])`` are
rotated by angle ``pos * theta ** (-2i / chunk_dim)`` (the "interleaved" convention).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def inverse_frequencies(axes_dims: Sequence[int], theta: float = 10000.0) -> np.ndarray:
    """Per-pair inverse frequencies for every axis, concatenated: (sum(axes_dims) // 2,) float32.

    Computed in float64 on the host (like diffusers) and rounded once.
    """
    out = []
    for d in axes_dims:
        if d % 2:
            raise ValueError(f"every RoPE axis dim must be even, got {tuple(axes_dims)}")
        out.append(1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    return np.concatenate(out).astype(np.float32)


def rope_angles(ids: jax.Array, axes_dims: Sequence[int], theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """Cos/sin tables for position ids.

    ids: (S, n_axes) integer or float positions -> (cos, sin), each (S, sum(axes_dims) // 2) float32.
    """
    if ids.shape[-1] != len(axes_dims):
        raise ValueError(f"ids have {ids.shape[-1]} axes but axes_dims_rope is {tuple(axes_dims)}")
    inv = jnp.asarray(inverse_frequencies(axes_dims, theta))
    # Position of each pair along its own axis: repeat axis i's position d_i // 2 times.
    axis_of_pair = np.repeat(np.arange(len(axes_dims)), [d // 2 for d in axes_dims])
    pos = ids.astype(jnp.float32)[:, axis_of_pair]  # (S, P)
    angles = pos * inv[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs of the last axis.

    x: (B, S, H, D); cos/sin: (S, D // 2). Math in float32; returns x's dtype.
    """
    b, s, h, d = x.shape
    xf = x.astype(jnp.float32).reshape(b, s, h, d // 2, 2)
    re, im = xf[..., 0], xf[..., 1]
    c, sn = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([re * c - im * sn, im * c + re * sn], axis=-1)
    return out.reshape(b, s, h, d).astype(x.dtype)
