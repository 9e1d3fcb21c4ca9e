"""Test setup: 8 fake CPU devices, float32 matmuls, fast-failing collectives.

Must run before JAX initialises its backends, hence at conftest import time.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "collective_call_terminate_timeout" not in _flags:
    _flags += " --xla_cpu_collective_call_terminate_timeout_seconds=60"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def make_tiny_policy(*, lora=True, seed=0):
    """A seconds-fast world `Policy`: tiny pixel-space Flux + world text encoder (random weights)."""
    import ml_collections
    from flax import nnx

    from arr_jax.nn.lora import LoRAConfig
    from arr_jax.policies.base import Policy
    from arr_jax.world.policy import PixelSpace, PromptEncoder, WorldPolicy

    m = ml_collections.ConfigDict(dict(patch_size=8, num_layers=1, num_single_layers=1, heads=2, head_dim=8,
                                       rope_dims=(2, 2, 4), rope_theta=16.0, text_dim=16, pooled_dim=8, text_width=16,
                                       text_heads=2, text_layers=1, max_tokens=8))
    lcfg = LoRAConfig(rank=2, alpha=4.0, targets=LoRAConfig().targets) if lora else None
    net = WorldPolicy(m, rngs=nnx.Rngs(seed), lora=lcfg)
    px = PixelSpace(32, 8, 8)
    enc = PromptEncoder(net.text, 8)
    return Policy(kind="world", model=net.flux, apply_fn=px.apply, encode_fn=lambda items: enc([i.text for i in items]),
                  decode_fn=lambda params, x0: px.decode(x0), decode_params=None, latent_shape=px.latent_shape)


def make_tiny_trainer(*, rules=None, lora=True, seed=0, judge=None, **settings):
    """A seconds-fast RPOTrainer: tiny pixel-space Flux + world text encoder + world judge."""
    import jax.numpy as jnp

    from arr_jax.rpo.trainer import RPOSettings, RPOTrainer
    from arr_jax.world.judge import WorldJudge

    kw = dict(pairs_per_batch=4, micro_batch=4, num_steps=4, ppo_epochs=1, learning_rate=1e-3, eta=0.7)
    kw.update(settings)
    trainer = RPOTrainer(make_tiny_policy(lora=lora, seed=seed), judge or WorldJudge(), RPOSettings(**kw),
                         rules=rules, seed=seed, trainable="lora" if lora else "full")
    if lora:  # nonzero adapters, so LoRA-on differs from the reference
        trainer.trainable = jax.tree.map(lambda x: x + 0.05 * jnp.ones_like(x), trainer.trainable)
    return trainer
