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


def inverse_frequencies_f32(dim: int, theta: float) -> np.ndarray:
    """``1 / theta ** (arange(0, dim, 2) / dim)``, (dim // 2,) float32, as transformers' default RoPE
    init computes it in float32 (Qwen3-VL text and vision), but with the power taken in float64 and
    rounded once: the quotient ``i / dim`` and the reciprocal are float32 steps like the reference's,
    so the table matches transformers' bit for bit wherever torch's float32 ``pow`` is correctly
    rounded (a plain numpy float32 ``pow`` differs in ~10% of the entries, and one ulp of a frequency
    is ~6e-4 rad at position 10^4).
    """
    e = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    power = (np.float64(theta) ** e.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / power).astype(np.float32)


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
