"""The three jitted RPO programs over one policy: rollout, reference pass and update.

Layout of a rollout batch (M micro-batches of ``mb`` samples; ``mb`` is the sharded axis so
every micro-batch spans all devices, and the rollout and the loss see identical shapes)::

    latents    (M, T+1, mb, *latent)   float32
    logp_old   (M, T, mb)              float32
    adv        (M, mb)                 float32
    cond       pytree of (M, mb, ...)  e.g. text embeddings

Samples of a prompt pair are adjacent: sample ``2p`` and ``2p+1`` in flattened order.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from arr_jax.diffusion.rollout import Trajectory, ode_sample, sde_rollout, step_log_prob
from arr_jax.diffusion.sde import gaussian_kl
from arr_jax.rpo.loss import kl_k1, ppo_clip_loss

ApplyFn = Callable[[nnx.Module, jax.Array, jax.Array, Any], jax.Array]  # (model, x, t, cond) -> v


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static loss hyper-parameters (SPEC §2 defaults)."""

    clip_eps: float = 0.2
    kl_beta: float = 0.01
    kl_type: str = "k1"          # "k1" (paper) or "gaussian" (Flow-GRPO closed form)
    eta: float = 0.3
    sde_kind: str = "dance"
    quantize_t: bool = True


class PolicyPrograms:
    """Builds pure, jitted functions of ``(trainable, frozen, ...)`` for one model graph.

    ``trainable`` is the nnx State the optimiser updates (LoRA params, or all params for full
    fine-tuning); ``frozen`` is the rest. The reference policy is ``ref_trainable``: zeros for
    LoRA (adapters off, no second copy of the base), the initial weights for full fine-tuning.
    """

    def __init__(self, graphdef: nnx.GraphDef, apply_fn: ApplyFn, loss: LossConfig,
                 tx: optax.GradientTransformation, sigmas: jax.Array):
        self.graphdef = graphdef
        self.apply_fn = apply_fn
        self.loss = loss
        self.tx = tx
        self.sigmas = jnp.asarray(sigmas, jnp.float32)
        self.rollout = jax.jit(self._rollout)
        self.ref_pass = jax.jit(self._ref_pass)
        self.logp_pass = jax.jit(self._logp_pass)
        self.train_step = jax.jit(self._train_step, donate_argnums=(0, 1))
        self.ode = jax.jit(self._ode)

    # --- pieces -------------------------------------------------------------------------
    def velocity_fn(self, trainable, frozen, cond):
        model = nnx.merge(self.graphdef, trainable, frozen)
        return lambda x, t: self.apply_fn(model, x, t, cond)

    def _score(self, trainable, frozen, cond, x, x_next, j):
        L = self.loss
        return step_log_prob(self.velocity_fn(trainable, frozen, cond), x, x_next, self.sigmas[j],
                             self.sigmas[j + 1], L.eta, kind=L.sde_kind, quantize_t=L.quantize_t)

    # --- programs -----------------------------------------------------------------------
    def _rollout(self, trainable, frozen, cond, x_init, key, sigmas) -> Trajectory:
        """One micro-batch: x_init (mb, *latent) → Trajectory with (T+1, mb, ...) latents.

        ``sigmas`` (T+1,) float32: the rollout's are ``self.sigmas`` (the ones the loss re-scores
        with); evaluation may sample on another schedule.
        """
        L = self.loss
        return sde_rollout(self.velocity_fn(trainable, frozen, cond), x_init, jnp.asarray(sigmas, jnp.float32),
                           L.eta, key, kind=L.sde_kind, quantize_t=L.quantize_t)

    def _ode(self, trainable, frozen, cond, x_init, sigmas):
        """Deterministic Euler sampling of one micro-batch on ``sigmas`` (T+1,); returns the final latent."""
        return ode_sample(self.velocity_fn(trainable, frozen, cond), x_init, jnp.asarray(sigmas, jnp.float32),
                          quantize_t=self.loss.quantize_t)

    def _ref_pass(self, ref_trainable, frozen, cond, latents, steps):
        """Reference-policy quantities for the trained ``steps`` (K,) of one micro-batch.

        Returns ``(logp_ref (K, mb), mean_ref (K, mb, ...))``; computed once per rollout.
        """
        def one(j):
            out = self._score(ref_trainable, frozen, cond, latents[j], latents[j + 1], j)
            return out.logp, out.mean
        return jax.lax.map(one, steps)

    def _logp_pass(self, trainable, frozen, cond, latents, steps):
        """Current-policy log-probs (K, mb) of the stored transitions (diagnostics)."""
        return jax.lax.map(lambda j: self._score(trainable, frozen, cond, latents[j], latents[j + 1], j).logp, steps)

    def _train_step(self, trainable, opt_state, frozen, batch, steps, step_pos, apply_update):
        """One optimiser step on the mean loss over all micro-batches × the chunk ``steps`` (K,).

        ``batch`` = dict(latents, logp_old, adv, cond, logp_ref[, mean_ref]) in the layout above;
        ``logp_ref``/``mean_ref`` are indexed by ``step_pos`` (K,), the positions of ``steps``
        in the trained-step list. Gradients are accumulated with ``lax.scan`` (one step of one
        micro-batch alive at a time). A non-finite loss or gradient leaves the state unchanged
        and is reported in ``metrics["nonfinite"]``.

        ``apply_update=False`` runs the very same executable as a forward-only pass (the
        backward and the optimiser sit behind ``lax.cond``) and returns the current log-probs
        ``logp`` (M, K, mb). Recording ``logp_old`` that way makes the on-policy ratio exactly 1
        by construction: the first real step re-runs the same compiled forward on the same
        inputs. (The rollout's own log-probs agree only to ~1 ulp, because XLA fuses a
        forward-only program differently from a forward+backward one; we report that gap
        as ``logp_mismatch``.)
        """
        L = self.loss
        num_micro = batch["adv"].shape[0]
        K = steps.shape[0]

        def loss_fn(tr, m, k):
            j = steps[k]
            lat = batch["latents"][m]
            cond = jax.tree.map(lambda c: c[m], batch["cond"])
            out = self._score(tr, frozen, cond, lat[j], lat[j + 1], j)
            adv = batch["adv"][m]
            pg, ratio, clipped = ppo_clip_loss(out.logp, batch["logp_old"][m, j], adv, L.clip_eps)
            if L.kl_type == "k1":
                kl = kl_k1(out.logp, batch["logp_ref"][m, step_pos[k]])
            else:
                kl = gaussian_kl(out.mean, batch["mean_ref"][m, step_pos[k]], out.std)
            loss = jnp.mean(pg + L.kl_beta * kl)
            aux = dict(loss=loss, pg_loss=jnp.mean(pg), kl=jnp.mean(kl), ratio_mean=jnp.mean(ratio),
                       ratio_sq=jnp.mean(ratio ** 2), clip_frac=jnp.mean(clipped),
                       ratio_max_dev=jnp.max(jnp.abs(ratio - 1.0)))
            return loss, (aux, out.logp)

        zeros = jax.tree.map(jnp.zeros_like, trainable)

        def acc(carry, idx):
            g_acc, aux_acc = carry
            m, k = idx // K, idx % K
            loss, vjp_fn, (aux, logp) = jax.vjp(lambda tr: loss_fn(tr, m, k), trainable, has_aux=True)
            g = jax.lax.cond(apply_update, lambda: vjp_fn(jnp.ones_like(loss))[0], lambda: zeros)
            g_acc = jax.tree.map(jnp.add, g_acc, g)
            aux_acc = {n: aux_acc[n] + aux[n] if n != "ratio_max_dev" else jnp.maximum(aux_acc[n], aux[n])
                       for n in aux_acc}
            return (g_acc, aux_acc), logp

        aux0 = {n: jnp.zeros((), jnp.float32) for n in
                ("loss", "pg_loss", "kl", "ratio_mean", "ratio_sq", "clip_frac", "ratio_max_dev")}
        (grads, aux), logps = jax.lax.scan(acc, (zeros, aux0), jnp.arange(num_micro * K))
        n = float(num_micro * K)
        grads = jax.tree.map(lambda g: g / n, grads)
        metrics = {k: (v if k == "ratio_max_dev" else v / n) for k, v in aux.items()}
        metrics["ratio_std"] = jnp.sqrt(jnp.maximum(metrics.pop("ratio_sq") - metrics["ratio_mean"] ** 2, 0.0))
        gnorm = optax.global_norm(grads)
        finite = jnp.isfinite(gnorm) & jnp.isfinite(metrics["loss"])

        def do_update(_):
            updates, new_opt = self.tx.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), new_opt

        new_tr, new_opt = jax.lax.cond(apply_update & finite, do_update, lambda _: (trainable, opt_state), None)
        metrics.update(grad_norm=gnorm, nonfinite=1.0 - finite.astype(jnp.float32))
        metrics["logp"] = logps.reshape((num_micro, K) + logps.shape[1:])
        return new_tr, new_opt, metrics


def make_optimizer(learning_rate: float, weight_decay: float = 1e-4, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, grad_clip: float = 1.0) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and a constant learning rate (SPEC §2)."""
    return optax.chain(optax.clip_by_global_norm(grad_clip),
                       optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
