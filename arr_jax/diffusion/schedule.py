"""Noise schedules for rectified-flow models: ``x_sigma = (1 - sigma) x0 + sigma * noise``."""
from __future__ import annotations

import numpy as np


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """Time shift ``sigma' = s*sigma / (1 + (s-1)*sigma)`` (SD3/FLUX); ``shift=1`` is the identity."""
    sigmas = np.asarray(sigmas, np.float64)
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def rollout_sigmas(num_steps: int, shift: float = 3.0) -> np.ndarray:
    """``(T+1,)`` float32 sigmas from 1 to 0: ``linspace(1, 0, T+1)`` time-shifted (SPEC §2)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_sigmas(np.linspace(1.0, 0.0, num_steps + 1), shift).astype(np.float32)


def flux_resolution_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                          base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift ``exp(mu)``, with ``mu`` linear in the token count."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = image_seq_len * m + (base_shift - m * base_seq_len)
    return float(np.exp(mu))


def model_timestep(sigma, quantize: bool = True):
    """The timestep the model sees. The release feeds ``int(sigma*1000)/1000`` (SPEC §2)."""
    import jax.numpy as jnp

    sigma = jnp.asarray(sigma, jnp.float32)
    return jnp.floor(sigma * 1000.0) / 1000.0 if quantize else sigma
