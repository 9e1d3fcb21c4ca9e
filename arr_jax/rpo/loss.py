"""The RPO objective per trained denoising step: PPO clip + beta * KL to the reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def ppo_clip_loss(logp_new: jax.Array, logp_old: jax.Array, adv: jax.Array, clip_eps: float):
    """``max(-A*rho, -A*clip(rho, 1-eps, 1+eps))`` per sample, with ``rho = exp(logp_new - logp_old)``.

    All (B,). Returns ``(loss, ratio, clipped)`` where ``clipped`` marks samples whose clipped
    term is the active one (zero gradient).
    """
    ratio = jnp.exp(logp_new - logp_old)
    unclipped = -adv * ratio
    clipped_term = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = jnp.maximum(unclipped, clipped_term)
    clipped = (clipped_term > unclipped).astype(jnp.float32)
    return loss, ratio, clipped


def kl_k1(logp_new: jax.Array, logp_ref: jax.Array) -> jax.Array:
    """The release's KL estimate on the stored transition: ``logp_theta - logp_ref`` (B,)."""
    return logp_new - jax.lax.stop_gradient(logp_ref)
