"""A small text encoder for the synthetic world's vocabulary (the demo's stand-in for T5 + CLIP).

Token embedding + learned positions + a few pre-LN transformer blocks. It returns what the
Flux transformer expects from the FLUX text stack: per-token states (like T5's) and a pooled
vector (like CLIP's), so the policy code path is the same as for FLUX.1-dev.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from arr_jax.nn.layers import Linear, layer_norm


@dataclasses.dataclass(frozen=True)
class WorldTextConfig:
    vocab_size: int = 32
    max_len: int = 8
    width: int = 64
    heads: int = 4
    layers: int = 2
    out_dim: int = 64       # Flux joint_attention_dim
    pooled_dim: int = 32    # Flux pooled_projection_dim


class _Block(nnx.Module):
    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.qkv = Linear(width, 3 * width, axes=("embed", "mlp"), rngs=rngs)
        self.out = Linear(width, width, axes=("mlp", "embed"), rngs=rngs)
        self.fc1 = Linear(width, 4 * width, axes=("embed", "mlp"), rngs=rngs)
        self.fc2 = Linear(4 * width, width, axes=("mlp", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x: (B, L, W); mask: (B, L) bool (True = real token)."""
        B, L, W = x.shape
        q, k, v = jnp.split(self.qkv(layer_norm(x)), 3, axis=-1)
        split = lambda t: t.reshape(B, L, self.heads, W // self.heads)  # noqa: E731
        att = jax.nn.dot_product_attention(split(q), split(k), split(v), mask=mask[:, None, None, :])
        x = x + self.out(att.reshape(B, L, W))
        return x + self.fc2(jax.nn.gelu(self.fc1(layer_norm(x))))


class WorldTextEncoder(nnx.Module):
    """tokens (B, L) int32, pad id 0 → (txt (B, L, out_dim), pooled (B, pooled_dim))."""

    def __init__(self, cfg: WorldTextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.width)),
                               axes=("vocab", "embed"))
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.max_len, cfg.width)),
                             axes=(None, "embed"))
        self.blocks = nnx.List([_Block(cfg.width, cfg.heads, rngs=rngs) for _ in range(cfg.layers)])
        self.proj = Linear(cfg.width, cfg.out_dim, axes=("embed", "mlp"), rngs=rngs)
        self.pool = Linear(cfg.width, cfg.pooled_dim, axes=("embed", "mlp"), rngs=rngs)

    def __call__(self, tokens: jax.Array):
        L = tokens.shape[1]
        if L > self.cfg.max_len:
            raise ValueError(f"{L} tokens exceed the text encoder's max_len={self.cfg.max_len}")
        mask = tokens > 0
        mask = mask.at[:, 0].set(True)  # an empty caption still attends to something
        x = self.embed[...][tokens] + self.pos[...][None, :L]
        for blk in self.blocks:
            x = blk(x, mask)
        x = layer_norm(x)
        m = mask[..., None].astype(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1)
        return self.proj(x) * m, self.pool(pooled)
