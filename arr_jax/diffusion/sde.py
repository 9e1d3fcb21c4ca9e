"""The flow SDE step with its Gaussian log-probability (DanceGRPO's ``flux_step``).

ONE pure float32 function, `sde_step`, serves both the rollout (which samples
``x_next`` and records ``logp_old``) and the RPO loss (which re-scores the stored
``x_next`` under the current parameters). Sharing it is what makes the on-policy
PPO ratio exactly 1.

With velocity ``v`` predicted at ``(x, sigma)`` and ``dsigma = sigma_next - sigma < 0``::

    x0_hat = x - sigma * v
    score  = -(x - (1 - sigma) * x0_hat) / sigma**2
    mean   = x + dsigma * v - 0.5 * eta**2 * score * dsigma
    std    = eta * sqrt(-dsigma)
    logp   = mean over latent dims of log N(x_next; mean, std**2)
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class StepOut(NamedTuple):
    x_next: jax.Array   # (B, ...) the next latent (sampled, or the given one)
    logp: jax.Array     # (B,) Gaussian log-density of x_next, averaged over latent dims
    mean: jax.Array     # (B, ...) the transition mean
    std: jax.Array      # () the transition std
    x0_hat: jax.Array   # (B, ...) the clean-sample prediction


def sde_step(v: jax.Array, x: jax.Array, sigma: jax.Array, sigma_next: jax.Array, eta: float,
             *, noise: jax.Array | None = None, x_next: jax.Array | None = None,
             kind: str = "dance") -> StepOut:
    """One SDE step. Give ``noise`` to sample ``x_next``, or ``x_next`` to score a stored one.

    Args:
      v, x: (B, ...) velocity and current latent (cast to float32 here).
      sigma, sigma_next: scalars (same for the whole batch).
      eta: noise level (SPEC default 0.3).
      kind: "dance" (DanceGRPO, the paper) or "flow_grpo" (Flow-GRPO's SDE, ``sd3_sde_with_logprob``:
        ``std_dev_t = eta * sqrt(sigma / (1 - sigma))`` with ``sigma_next`` in the denominator at
        ``sigma == 1``, the first step of every schedule `rollout_sigmas` makes).

    Returns `StepOut`; ``logp`` (B,) float32, ``std`` a float32 scalar. Raises ValueError for an unknown
    ``kind`` or when neither/both of ``noise``/``x_next`` are given.
    """
    if (noise is None) == (x_next is None):
        raise ValueError("sde_step needs exactly one of noise= (sample) or x_next= (score)")
    v = v.astype(jnp.float32)
    x = x.astype(jnp.float32)
    sigma = jnp.asarray(sigma, jnp.float32)
    sigma_next = jnp.asarray(sigma_next, jnp.float32)
    dsigma = sigma_next - sigma
    x0_hat = x - sigma * v
    if kind == "dance":
        score = -(x - (1.0 - sigma) * x0_hat) / (sigma * sigma)
        mean = x + dsigma * v - 0.5 * eta * eta * score * dsigma
        std = eta * jnp.sqrt(-dsigma)
    elif kind == "flow_grpo":
        # Flow-GRPO (sd3_sde_with_logprob): std_dev_t = eta * sqrt(sigma / (1 - sigma)), except that at
        # sigma == 1 (the first step) the denominator's sigma is replaced by sigmas[1], which is this
        # step's sigma_next. Only that denominator changes; every other sigma stays the true one.
        denom_sigma = jnp.where(sigma == 1.0, sigma_next, sigma)
        std_dev = eta * jnp.sqrt(sigma / (1.0 - denom_sigma))
        mean = (x * (1.0 + std_dev**2 / (2.0 * sigma) * dsigma)
                + v * (1.0 + std_dev**2 * (1.0 - sigma) / (2.0 * sigma)) * dsigma)
        std = std_dev * jnp.sqrt(-dsigma)
    else:
        raise ValueError(f"unknown SDE kind {kind!r}; use 'dance' or 'flow_grpo'")
    if x_next is None:
        x_next = mean + std * noise.astype(jnp.float32)
    x_next = jax.lax.stop_gradient(x_next.astype(jnp.float32))
    logp = -((x_next - mean) ** 2) / (2.0 * std * std) - jnp.log(std) - _LOG_SQRT_2PI
    logp = jnp.mean(logp, axis=tuple(range(1, logp.ndim)))
    return StepOut(x_next, logp, mean, std, x0_hat)


def ode_step(v: jax.Array, x: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
    """Deterministic Euler step of the flow ODE (evaluation sampling)."""
    return (x.astype(jnp.float32) + (sigma_next - sigma) * v.astype(jnp.float32))


def gaussian_kl(mean_a: jax.Array, mean_b: jax.Array, std: jax.Array) -> jax.Array:
    """Closed-form KL of two Gaussians with equal std: ``||mu_a - mu_b||^2 / (2 std^2)``, mean over dims. (B,)"""
    d = (mean_a.astype(jnp.float32) - mean_b.astype(jnp.float32)) ** 2 / (2.0 * std * std)
    return jnp.mean(d, axis=tuple(range(1, d.ndim)))
