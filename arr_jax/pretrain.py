"""Pretrain the demo's base policy: flow matching on the synthetic world with corrupted captions.

    python -m arr_jax.pretrain [--config configs/demo.py] [--config.pretrain.steps=3000]

Captions are corrupted per attribute (``world.p_wrong``, ``world.p_drop``), so the base policy
can draw every attribute value but binds it to the prompt unreliably: the starting point RPO
needs. Resumable (orbax checkpoints in ``pretrain.workdir``). Writes the base checkpoint
(safetensors + JSON with seed, config and loss) to ``base_checkpoint`` when that names a file,
else to ``<pretrain.workdir>/base_policy.safetensors``; it replaces the base policy shipped in
the package (the one the README's numbers come from) only with ``pretrain.replace_shipped=True``.
``pretrain.init_from`` names an earlier base file to start from (a longer pretraining) instead of
random weights.
"""
from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from arr_jax.world import spec
from arr_jax.world.policy import PixelSpace, WorldPolicy, save_base


def load_world_arrays(cfg, split: str):
    """(images uint8 (N,H,W,3), captions list[str], prompts list[str]) of a world split (built if missing)."""
    from arr_jax.data import world_tfds

    w = cfg.world
    builder = world_tfds.build_world(w.data_dir, n_train=w.n_train, n_heldout=w.n_heldout,
                                     p_wrong=dict(w.p_wrong), p_drop=w.p_drop, image_size=w.image_size,
                                     seed=cfg.seed)
    arr = world_tfds.to_arrays(builder.as_data_source(split=split))
    return arr["image"], list(arr["caption"]), list(arr["prompt"])


def make_train_step(graphdef, tx, patch: int, size: int, max_tokens: int, time_shift: float,
                    loss_floor: float = 0.0):
    """Jitted flow-matching step: ``x_s = (1-s) x0 + s n``, loss ``w(s) |v_pred - (n - x0)|^2``.

    ``w(s) = s^2 / (s^2 + loss_floor)`` (1 when ``loss_floor = 0``, plain velocity matching). With
    an x0-predicting network the velocity error is the x0 error over ``s``, so plain velocity
    matching weights low-noise detail by ``1/s^2``; a ``loss_floor`` c caps that weight at ``1/c``
    and leaves relatively more of the gradient to the high-noise steps where the caption decides
    layout, colour and shape.

    ``v_pred`` comes from `PixelSpace.apply` (an x0-predicting network turned into a velocity),
    the same function the RPO rollout calls.
    """
    px = PixelSpace(size, patch, max_tokens)

    def loss_fn(params, images, tokens, key):
        policy = nnx.merge(graphdef, params)
        x0 = px.encode_images(images)
        k1, k2 = jax.random.split(key)
        u = jax.random.uniform(k1, (x0.shape[0],))
        sigma = time_shift * u / (1.0 + (time_shift - 1.0) * u)
        noise = jax.random.normal(k2, x0.shape)
        s = sigma[:, None, None]
        x_t = (1.0 - s) * x0 + s * noise
        txt, pooled = policy.text(tokens)
        v = px.apply(policy.flux, x_t, sigma, {"txt": txt, "pooled": pooled})
        w = sigma ** 2 / (sigma ** 2 + loss_floor)
        return jnp.mean(w[:, None, None] * (v - (noise - x0)) ** 2)

    def step(params, opt_state, images, tokens, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, tokens, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)

    return jax.jit(step, donate_argnums=(0, 1))


def output_path(cfg) -> Path:
    """Where `run` writes the base checkpoint (see the module docstring)."""
    from arr_jax.policies.world import shipped_base_checkpoint

    if cfg.pretrain.get("replace_shipped", False):
        return shipped_base_checkpoint()
    if cfg.base_checkpoint:
        out = Path(cfg.base_checkpoint)
        if out.resolve() == shipped_base_checkpoint().resolve():
            raise ValueError(f"--config.base_checkpoint={out} is the shipped base policy; set "
                             "--config.pretrain.replace_shipped=True to overwrite it")
        return out
    return Path(cfg.pretrain.workdir) / "base_policy.safetensors"


def run(cfg) -> dict:
    """Pretrain (resuming if a checkpoint exists) and write the base checkpoint. Returns info."""
    from tqdm.auto import tqdm

    from arr_jax.checkpoint import Checkpointer

    pc = cfg.pretrain
    out = output_path(cfg)  # a refused destination stops before any work
    t_start = time.perf_counter()
    images, captions, _ = load_world_arrays(cfg, "train")
    tokens, _ = spec.tokenize(captions, cfg.model.max_tokens)
    policy = WorldPolicy(cfg.model, rngs=nnx.Rngs(cfg.seed))
    init_from = pc.get("init_from", "")
    if init_from:  # longer pretraining: start from an earlier base (its config must match cfg.model)
        from arr_jax.world.policy import load_base

        earlier = load_base(policy, init_from)
        print(f"pretraining from {init_from} ({earlier.get('steps')} steps, loss {earlier.get('final_loss')})")
    graphdef, params = nnx.split(policy, nnx.Param)
    sched = optax.warmup_cosine_decay_schedule(0.0, pc.learning_rate, min(pc.warmup, pc.steps // 2),
                                             pc.steps, pc.learning_rate * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=1e-4))
    opt_state = tx.init(params)
    step_fn = make_train_step(graphdef, tx, cfg.model.patch_size, cfg.world.image_size, cfg.model.max_tokens,
                              pc.time_shift, pc.get("loss_floor", 0.0))
    ckpt = Checkpointer(Path(pc.workdir).absolute() / "checkpoints", max_to_keep=2,
                        model_signature={"model": cfg.model.to_dict(), "seed": cfg.seed})
    start = 0
    if ckpt.latest_step() is not None:
        state, _ = ckpt.restore({"params": params, "opt_state": opt_state})
        params, opt_state = state["params"], state["opt_state"]
        start = ckpt.latest_step()
        print(f"resuming pretraining from step {start}")
    key = jax.random.key(cfg.seed)
    losses = []
    bar = tqdm(range(start, pc.steps), desc="pretrain", initial=start, total=pc.steps, dynamic_ncols=True)
    for it in bar:
        rng = np.random.default_rng([cfg.seed, it])  # data order is a function of the step: exact resume
        idx = rng.integers(0, len(images), pc.batch_size)
        params, opt_state, loss, gnorm = step_fn(params, opt_state, jnp.asarray(images[idx]),
                                                 jnp.asarray(tokens[idx]), jax.random.fold_in(key, it))
        if it % 10 == 0 or it == pc.steps - 1:
            losses.append((it, float(loss)))
            bar.set_postfix(loss=f"{float(loss):.4f}", gnorm=f"{float(gnorm):.2f}")
            if not np.isfinite(float(loss)):
                raise FloatingPointError(f"pretraining loss became {float(loss)} at step {it}; lower "
                                         f"--config.pretrain.learning_rate (now {pc.learning_rate})")
        if (it + 1) % pc.checkpoint_every == 0 or it + 1 == pc.steps:
            ckpt.save(it + 1, {"params": params, "opt_state": opt_state}, force=True)
    ckpt.wait()
    nnx.update(policy, params)
    info = {"seed": cfg.seed, "steps": pc.steps, "init_from": init_from or None,
            "model": cfg.model.to_dict(), "world": cfg.world.to_dict(),
            "pretrain": pc.to_dict(), "final_loss": losses[-1][1] if losses else None,
            "seconds_this_run": time.perf_counter() - t_start}
    save_base(policy, out, info)
    print(f"wrote base policy {out} (final loss {info['final_loss']})")
    if not cfg.base_checkpoint and not cfg.pretrain.get("replace_shipped", False):
        print(f"use it with --config.base_checkpoint={out}")
    return info


def main(argv):
    del argv
    from arr_jax.cli import config_from_flags

    run(config_from_flags())


if __name__ == "__main__":
    from arr_jax.cli import run_main

    run_main(main)
