"""The RPO loop: rollout pairs → judge → rewards → PPO-clip + KL updates, with metrics and resume.

Policy-agnostic: the trainer sees a model (nnx Module), ``apply_fn(model, x, t, cond) -> v``,
``decode_fn(x0) -> uint8 images``, ``encode_fn(prompts) -> cond`` and a `Judge`. The same loop
drives the tiny pixel-space Flux of the CPU demo and FLUX.1-dev on a pod.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from arr_jax.diffusion.schedule import rollout_sigmas
from arr_jax.rpo.programs import LossConfig, PolicyPrograms, make_optimizer
from arr_jax.rpo.rewards import pair_rewards
from arr_jax.sharding import ShardingRules, param_shardings

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RPOSettings:
    """Hyper-parameters of the RPO loop; defaults are the paper's T2I settings (SPEC §2)."""

    learning_rate: float = 5e-5
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    clip_eps: float = 0.2
    kl_beta: float = 0.01
    kl_type: str = "k1"
    eta: float = 0.3
    sde_kind: str = "dance"
    time_shift: float = 3.0
    num_steps: int = 8                  # rollout denoising steps T
    train_window: tuple[int, int] | None = None  # trained steps [lo, hi) within 0..T-2; None = all but last
    pairs_per_batch: int = 32
    micro_batch: int = 64               # samples per forward (shape unit of rollout and update)
    ppo_epochs: int = 1
    steps_per_update: int = 0           # trained steps per optimiser step; 0 = all of them
    win_reward: float = 1.0
    lose_penalty: float = 0.1
    shared_noise: bool = True           # both samples of a pair start from the same x_T
    quantize_t: bool = True
    nan_policy: str = "skip"            # "skip" (count and keep going) or "stop"
    recompute_logp_old: bool = True     # logp_old from the update executable: on-policy ratio exactly 1

    def trained_steps(self) -> np.ndarray:
        lo, hi = self.train_window if self.train_window is not None else (0, self.num_steps - 1)
        if not (0 <= lo < hi <= self.num_steps - 1):
            raise ValueError(f"train_window {self.train_window} must satisfy 0 <= lo < hi <= num_steps-1 "
                             f"= {self.num_steps - 1}")
        return np.arange(lo, hi, dtype=np.int32)

    def validate(self) -> None:
        checks = [
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (0 < self.clip_eps < 1, "clip_eps must be in (0, 1)"),
            (self.kl_beta >= 0, "kl_beta must be >= 0"),
            (self.kl_type in ("k1", "gaussian"), "kl_type must be 'k1' or 'gaussian'"),
            (self.eta > 0, "eta must be > 0 (the SDE needs noise for a log-probability)"),
            (self.sde_kind in ("dance", "flow_grpo"), "sde_kind must be 'dance' or 'flow_grpo'"),
            (self.num_steps >= 2, "num_steps must be >= 2"),
            (self.pairs_per_batch >= 1, "pairs_per_batch must be >= 1"),
            (self.micro_batch >= 2 and self.micro_batch % 2 == 0, "micro_batch must be even and >= 2"),
            ((2 * self.pairs_per_batch) % self.micro_batch == 0,
             f"2*pairs_per_batch ({2 * self.pairs_per_batch}) must be a multiple of micro_batch ({self.micro_batch})"),
            (self.ppo_epochs >= 1, "ppo_epochs must be >= 1"),
            (self.steps_per_update >= 0, "steps_per_update must be >= 0"),
            (self.nan_policy in ("skip", "stop"), "nan_policy must be 'skip' or 'stop'"),
            (self.grad_clip > 0, "grad_clip must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"bad RPO setting: {msg}")
        self.trained_steps()


def rpo_settings(section) -> RPOSettings:
    """`RPOSettings` from a config section (extra keys such as ``iterations`` are ignored)."""
    names = {f.name for f in dataclasses.fields(RPOSettings)}
    kw = {k: v for k, v in section.items() if k in names}
    if kw.get("train_window") is not None:
        kw["train_window"] = tuple(kw["train_window"])
    return RPOSettings(**kw)


class NonFiniteLossError(FloatingPointError):
    """Raised under ``nan_policy='stop'`` when an update produced a NaN/Inf loss or gradient."""


class RPOTrainer:
    """Holds the policy state (trainable / frozen / reference / optimiser) and runs RPO iterations."""

    def __init__(self, model: nnx.Module, *, apply_fn: Callable, decode_fn: Callable,
                 encode_fn: Callable[[Sequence[str]], Any], latent_shape: tuple[int, ...], judge,
                 settings: RPOSettings, trainable: Any = None, rules: ShardingRules | None = None,
                 seed: int = 0):
        settings.validate()
        self.s = settings
        self.judge = judge
        self.encode_fn = encode_fn
        self.latent_shape = tuple(latent_shape)
        self.rules = rules
        from arr_jax.nn.lora import LoRAParam

        has_lora = any(True for _ in jax.tree.leaves(nnx.state(model, LoRAParam)))
        if trainable not in (None, "lora", "full"):
            raise ValueError(f"trainable must be 'lora', 'full' or None (auto), got {trainable!r}")
        if trainable == "lora" and not has_lora:
            raise ValueError("trainable='lora' but the model has no LoRA adapters (set a LoRAConfig)")
        self.mode = "lora" if (trainable is None and has_lora) or trainable == "lora" else "full"
        filt = LoRAParam if self.mode == "lora" else nnx.Param
        self.graphdef, tr, fr = nnx.split(model, filt, ...)
        if rules is not None and rules.mesh is not None:
            tr = jax.device_put(tr, param_shardings(tr, rules))
            fr = jax.device_put(fr, param_shardings(fr, rules))
        self.trainable, self.frozen = tr, fr
        # Reference policy: LoRA off (zeroed adapters) or the initial full weights.
        self.ref_trainable = (jax.tree.map(jnp.zeros_like, tr) if self.mode == "lora"
                              else jax.tree.map(jnp.copy, tr))
        self.tx = make_optimizer(settings.learning_rate, settings.weight_decay, grad_clip=settings.grad_clip)
        self.opt_state = jax.jit(self.tx.init)(self.trainable)
        self.sigmas = rollout_sigmas(settings.num_steps, settings.time_shift)
        loss = LossConfig(clip_eps=settings.clip_eps, kl_beta=settings.kl_beta, kl_type=settings.kl_type,
                          eta=settings.eta, sde_kind=settings.sde_kind, quantize_t=settings.quantize_t)
        self.programs = PolicyPrograms(self.graphdef, apply_fn, loss, self.tx, self.sigmas)
        self._decode = jax.jit(decode_fn)
        self.key = jax.random.key(seed)
        self.iteration = 0
        self.counters = {"nonfinite_updates": 0}

    # --- sharding helpers ---------------------------------------------------------------
    def _put(self, x, batch_axis: int):
        if self.rules is None or self.rules.mesh is None:
            return jnp.asarray(x)
        spec = [None] * np.ndim(x)
        spec[batch_axis] = self.rules.rules["batch"]
        return jax.device_put(x, NamedSharding(self.rules.mesh, P(*spec)))

    def state_dict(self) -> dict:
        d = {"trainable": self.trainable, "opt_state": self.opt_state, "rng": self.key,
             "iteration": jnp.asarray(self.iteration, jnp.int32)}
        if self.mode == "full":
            d["reference"] = self.ref_trainable
        return d

    def load_state_dict(self, d: dict) -> None:
        self.trainable, self.opt_state, self.key = d["trainable"], d["opt_state"], d["rng"]
        self.iteration = int(d["iteration"])
        if "reference" in d:
            self.ref_trainable = d["reference"]

    # --- one iteration ------------------------------------------------------------------
    def rollout(self, prompts: Sequence[str], key: jax.Array, trainable=None) -> dict:
        """Two SDE samples per prompt. Returns the device batch plus host images (2P, H, W, 3)."""
        s = self.s
        trainable = self.trainable if trainable is None else trainable
        n_pairs = len(prompts)
        B, mb = 2 * n_pairs, s.micro_batch
        if B % mb:
            raise ValueError(f"{n_pairs} prompts give {B} samples, not a multiple of micro_batch={mb}")
        M = B // mb
        k_noise, k_sde = jax.random.split(key)
        if s.shared_noise:
            x0 = jax.random.normal(k_noise, (n_pairs,) + self.latent_shape, jnp.float32)
            x_init = jnp.repeat(x0, 2, axis=0)
        else:
            x_init = jax.random.normal(k_noise, (B,) + self.latent_shape, jnp.float32)
        cond = self.encode_fn(list(prompts))
        cond = jax.tree.map(lambda c: jnp.repeat(jnp.asarray(c), 2, axis=0).reshape((M, mb) + c.shape[1:]), cond)
        x_init = x_init.reshape((M, mb) + self.latent_shape)
        lat, logp, x0s = [], [], []
        for m in range(M):
            c_m = jax.tree.map(lambda c: self._put(c[m], 0), cond)
            traj = self.programs.rollout(trainable, self.frozen, c_m, self._put(x_init[m], 0),
                                         jax.random.fold_in(k_sde, m))
            lat.append(traj.latents)
            logp.append(traj.log_probs)
            x0s.append(traj.x0)
        images = np.concatenate([np.asarray(self._decode(x)) for x in x0s], axis=0)
        return {"latents": jnp.stack(lat), "logp_old": jnp.stack(logp), "cond": cond, "images": images,
                "prompts": list(prompts)}

    def judge_batch(self, batch: dict) -> tuple[np.ndarray, dict]:
        """Judge each pair; returns advantages (2P,) and judge metrics."""
        imgs, prompts = batch["images"], batch["prompts"]
        res = self.judge.compare(prompts, imgs[0::2], imgs[1::2])
        rewards = pair_rewards(res.winner, self.s.win_reward, self.s.lose_penalty)
        m = {"reward_mean": float(rewards.mean()), "tie_rate": float(np.mean(res.winner == 0)),
             "decisive_rate": float(np.mean(res.winner != 0))}
        for name, v in (res.criteria or {}).items():
            m[f"criteria/{name}"] = float(np.mean(v))
        for name, n in (res.failures or {}).items():
            m[f"judge_failures/{name}"] = float(n)
        return rewards.reshape(-1), m

    def update(self, batch: dict, adv: np.ndarray, rng: np.random.Generator) -> dict:
        """PPO epochs over the trained steps; returns metrics averaged over optimiser steps."""
        s = self.s
        M, mb = batch["logp_old"].shape[0], batch["logp_old"].shape[2]
        steps_all = s.trained_steps()
        K = len(steps_all)
        dev = {"latents": batch["latents"], "logp_old": batch["logp_old"],
               "adv": self._put(jnp.asarray(adv, jnp.float32).reshape(M, mb), 1),
               "cond": jax.tree.map(lambda c: self._put(c, 1), batch["cond"])}
        refs = [self.programs.ref_pass(self.ref_trainable, self.frozen,
                                       jax.tree.map(lambda c: c[m], dev["cond"]), dev["latents"][m],
                                       jnp.asarray(steps_all)) for m in range(M)]
        dev["logp_ref"] = jnp.stack([r[0] for r in refs])
        if s.kl_type == "gaussian":
            dev["mean_ref"] = jnp.stack([r[1] for r in refs])
        del refs
        chunk = s.steps_per_update or K
        orders = [rng.permutation(K) for _ in range(s.ppo_epochs)]
        if s.recompute_logp_old:
            dev["logp_old"] = self._recompute_logp_old(dev, steps_all, orders[0], chunk)
        history = []
        for order in orders:
            for c0 in range(0, K, chunk):
                pos = order[c0:c0 + chunk]
                self.trainable, self.opt_state, met = self.programs.train_step(
                    self.trainable, self.opt_state, self.frozen, dev, jnp.asarray(steps_all[pos]),
                    jnp.asarray(pos, jnp.int32), jnp.asarray(True))
                met.pop("logp")
                met = jax.device_get(met)  # also blocks: keeps CPU collectives from piling up
                if met["nonfinite"] > 0:
                    self.counters["nonfinite_updates"] += 1
                    if s.nan_policy == "stop":
                        raise NonFiniteLossError(
                            f"non-finite loss or gradient at iteration {self.iteration} (loss={met['loss']}, "
                            f"grad_norm={met['grad_norm']}); set nan_policy='skip' to skip such updates")
                history.append(met)
        out = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
        out["ratio_max_dev"] = float(max(h["ratio_max_dev"] for h in history))
        out["ratio_max_dev_first_step"] = float(history[0]["ratio_max_dev"])
        out["optimizer_steps"] = len(history)
        if s.recompute_logp_old:
            out["logp_mismatch"] = self._last_mismatch
        out["nonfinite_updates_total"] = self.counters["nonfinite_updates"]
        return out

    def _recompute_logp_old(self, dev: dict, steps_all: np.ndarray, order: np.ndarray, chunk: int):
        """logp_old from forward-only runs of the update executable (see `PolicyPrograms._train_step`)."""
        rollout_logp = jnp.asarray(dev["logp_old"])
        new = rollout_logp
        for c0 in range(0, len(order), chunk):
            pos = order[c0:c0 + chunk]
            idx = jnp.asarray(steps_all[pos])
            self.trainable, self.opt_state, met = self.programs.train_step(
                self.trainable, self.opt_state, self.frozen, dev, idx, jnp.asarray(pos, jnp.int32),
                jnp.asarray(False))
            new = new.at[:, idx].set(met["logp"])
        trained = jnp.asarray(steps_all)
        self._last_mismatch = float(jnp.max(jnp.abs(new[:, trained] - rollout_logp[:, trained])))
        return new

    def step(self, prompts: Sequence[str]) -> dict:
        """One full RPO iteration on ``prompts`` (rollout, judge, update)."""
        t0 = time.perf_counter()
        key = jax.random.fold_in(self.key, self.iteration)
        batch = self.rollout(prompts, key)
        t1 = time.perf_counter()
        adv, jm = self.judge_batch(batch)
        t2 = time.perf_counter()
        rng = np.random.default_rng(int(jax.random.randint(jax.random.fold_in(key, 7), (), 0, 2**31 - 1)))
        um = self.update(batch, adv, rng)
        t3 = time.perf_counter()
        self.iteration += 1
        return {**jm, **um, "time/rollout": t1 - t0, "time/judge": t2 - t1, "time/update": t3 - t2}

    # --- evaluation helpers ---------------------------------------------------------------
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], *, use_reference: bool = False,
                 sampler: str = "sde") -> np.ndarray:
        """One image per (prompt, seed): uint8 (n, H, W, 3). The noise depends only on the seed,
        so the current and the reference policy are compared on identical noise."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        tr = self.ref_trainable if use_reference else self.trainable
        mb, n = self.s.micro_batch, len(prompts)
        out = []
        for lo in range(0, n, mb):
            ps, ss = list(prompts[lo:lo + mb]), list(seeds[lo:lo + mb])
            pad = mb - len(ps)
            ps, ss = ps + [ps[-1]] * pad, ss + [ss[-1]] * pad  # keep one compiled shape
            keys = [jax.random.fold_in(jax.random.key(0), int(s)) for s in ss]
            x_init = jnp.stack([jax.random.normal(k, self.latent_shape) for k in keys])
            cond = jax.tree.map(lambda c: self._put(c, 0), self.encode_fn(ps))
            x_init = self._put(x_init, 0)
            if sampler == "ode":
                x0 = self.programs.ode(tr, self.frozen, cond, x_init)
            else:  # the rollout sampler, its step noise also fixed by the first seed of the chunk
                x0 = self.programs.rollout(tr, self.frozen, cond, x_init,
                                           jax.random.fold_in(jax.random.key(1), int(ss[0]))).x0
            out.append(np.asarray(self._decode(x0))[:mb - pad])
        return np.concatenate(out, axis=0)
