"""Jitted samplers: the SDE rollout that records what RPO needs, and the ODE sampler.

Both are one ``lax.scan`` over denoising steps. ``velocity_fn(x, t) -> v`` is a closure
over the (possibly sharded) parameters and conditioning, traced inside the caller's jit.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from arr_jax.diffusion.schedule import model_timestep
from arr_jax.diffusion.sde import ode_step, sde_step

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x (B,...), t (B,)) -> v (B,...)


class Trajectory(NamedTuple):
    latents: jax.Array    # (T+1, B, ...) x_0 (noise, sigma=1) ... x_T; float32
    log_probs: jax.Array  # (T, B) logp_old of each transition
    x0: jax.Array         # (B, ...) the last step's clean prediction: what gets decoded and judged


def sde_rollout(velocity_fn: VelocityFn, x_init: jax.Array, sigmas: jax.Array, eta: float,
                key: jax.Array, *, kind: str = "dance", quantize_t: bool = True) -> Trajectory:
    """Sample ``T = len(sigmas) - 1`` SDE steps from ``x_init`` (B, ...), keeping every latent and log-prob."""
    num_steps = sigmas.shape[0] - 1
    batch = x_init.shape[0]

    def body(x, i):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        t = jnp.full((batch,), model_timestep(sigma, quantize_t))
        v = velocity_fn(x, t)
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        out = sde_step(v, x, sigma, sigma_next, eta, noise=noise, kind=kind)
        return out.x_next, (out.x_next, out.logp, out.x0_hat)

    x_init = x_init.astype(jnp.float32)
    _, (xs, logps, x0s) = jax.lax.scan(body, x_init, jnp.arange(num_steps))
    latents = jnp.concatenate([x_init[None], xs], axis=0)
    return Trajectory(latents=latents, log_probs=logps, x0=x0s[-1])


def ode_sample(velocity_fn: VelocityFn, x_init: jax.Array, sigmas: jax.Array, *,
               quantize_t: bool = False) -> jax.Array:
    """Deterministic Euler sampling (evaluation); returns the final ``x`` (B, ...)."""
    batch = x_init.shape[0]

    def body(x, i):
        t = jnp.full((batch,), model_timestep(sigmas[i], quantize_t))
        return ode_step(velocity_fn(x, t), x, sigmas[i], sigmas[i + 1]), None

    x, _ = jax.lax.scan(body, x_init.astype(jnp.float32), jnp.arange(sigmas.shape[0] - 1))
    return x


def step_log_prob(velocity_fn: VelocityFn, x: jax.Array, x_next: jax.Array, sigma: jax.Array,
                  sigma_next: jax.Array, eta: float, *, kind: str = "dance", quantize_t: bool = True):
    """Re-score a stored transition ``x -> x_next`` (the loss side of `sde_rollout`).

    Returns `arr_jax.diffusion.sde.StepOut` (``logp`` (B,), ``mean``, ``std``).
    """
    t = jnp.full((x.shape[0],), model_timestep(sigma, quantize_t))
    v = velocity_fn(x, t)
    return sde_step(v, x, sigma, sigma_next, eta, x_next=x_next, kind=kind)
