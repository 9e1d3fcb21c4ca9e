"""T5 v1.1 encoder (transformers ``T5EncoderModel``) in Flax NNX: FLUX's ``text_encoder_2``.

Per block: ``x += o(attn(layer_norm(x)))``; ``x += wo(act(wi_0(ln(x))) * wi_1(ln(x)))``; then a
final RMS layer norm. T5 specifics:
  * RMS-style layer norm (no mean, no bias), statistics in float32;
  * attention logits are *not* scaled by 1/sqrt(d_kv);
  * a learned relative-position bias (bucketed, bidirectional) lives in block 0 and is added
    to the logits of every block;
  * the token embedding is ``shared``; no positional embedding.

FLUX runs it on prompts padded to ``max_length`` (512 for dev) *without* an attention mask;
`T5Encoder.__call__` takes an optional padding mask for other users.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arr_jax.nn.layers import Linear, RMSNorm
from arr_jax.sharding import ShardingRules, shard

Dtype = Any

_ACTS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    """The fields of a transformers ``T5Config`` that the encoder depends on (defaults: t5-v1_1-xxl)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "gelu_new"
    is_gated_act: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "T5EncoderConfig":
        """Build from a transformers config dict (``feed_forward_proj`` decides the FFN as in T5Config)."""
        if d.get("model_type", "t5") != "t5":
            raise ValueError(f"expected a T5 config (model_type 't5'), got model_type={d.get('model_type')!r}")
        ff = d.get("feed_forward_proj", "relu")
        parts = ff.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"T5 feed_forward_proj={ff!r} is not of the form '<act>' or 'gated-<act>'")
        gated = len(parts) == 2
        act = "gelu_new" if ff == "gated-gelu" else parts[-1]
        act = d.get("dense_act_fn", act)
        if act not in _ACTS:
            raise ValueError(f"T5 activation {act!r} is not supported; known: {sorted(_ACTS)}")
        return cls(
            vocab_size=d["vocab_size"], d_model=d["d_model"], d_kv=d["d_kv"], d_ff=d["d_ff"],
            num_layers=d["num_layers"], num_heads=d["num_heads"],
            relative_attention_num_buckets=d.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=d.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-6),
            dense_act_fn=act, is_gated_act=bool(d.get("is_gated_act", gated)),
        )


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket of ``key_pos - query_pos``: (q_len, k_len) int32, built on the host.

    Half the buckets hold the sign; within a half, distances below ``num_buckets // 4`` get their
    own bucket and larger ones share log-spaced buckets up to ``max_distance``. The log math is
    done in float32, in the same order as transformers, so bucket edges agree exactly.
    """
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    half = num_buckets // 2
    out = (rel > 0).astype(np.int32) * half
    n = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        large = (np.log(n.astype(np.float32) / np.float32(max_exact))
                 / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
    large = np.minimum(max_exact + np.where(n < max_exact, 0, large).astype(np.int32), half - 1)
    return out + np.where(n < max_exact, n, large).astype(np.int32)


class T5Attention(nnx.Module):
    """Multi-head self-attention without logit scaling; block 0 also owns ``relative_attention_bias``."""

    def __init__(self, cfg: T5EncoderConfig, *, has_relative_bias: bool, dtype: Dtype, rngs: nnx.Rngs,
                 rules: ShardingRules | None = None):
        inner = cfg.num_heads * cfg.d_kv
        self.cfg = cfg
        self.rules = rules
        lin = dict(use_bias=False, param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.q = Linear(cfg.d_model, inner, axes=("embed", "heads"), **lin)
        self.k = Linear(cfg.d_model, inner, axes=("embed", "heads"), **lin)
        self.v = Linear(cfg.d_model, inner, axes=("embed", "heads"), **lin)
        self.o = Linear(inner, cfg.d_model, axes=("heads", "embed"), **lin)
        if has_relative_bias:
            self.relative_attention_bias = nnx.Embed(
                cfg.relative_attention_num_buckets, cfg.num_heads, param_dtype=dtype, rngs=rngs,
                embedding_metadata={"axes": (None, "heads")})
        else:
            self.relative_attention_bias = nnx.data(None)

    def position_bias(self, q_len: int, k_len: int) -> jax.Array:
        """(1, H, q_len, k_len) float32 bias from this layer's bucket embedding."""
        buckets = relative_position_buckets(q_len, k_len, self.cfg.relative_attention_num_buckets,
                                            self.cfg.relative_attention_max_distance)
        table = self.relative_attention_bias.embedding[...].astype(jnp.float32)  # (buckets, H)
        return jnp.transpose(table[jnp.asarray(buckets)], (2, 0, 1))[None]

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """x: (B, S, D); bias: (1 or B, H, S, S) float32 (position bias + mask) -> (B, S, D)."""
        b, s, _ = x.shape
        h, dk = self.cfg.num_heads, self.cfg.d_kv

        def heads(t):
            return shard(t.reshape(b, s, h, dk), self.rules, "batch", "seq", "act_heads", None)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, h * dk)
        return self.o(out)


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, cfg: T5EncoderConfig, *, has_relative_bias: bool, dtype: Dtype, rngs: nnx.Rngs,
                 rules: ShardingRules | None = None):
        self.SelfAttention = T5Attention(cfg, has_relative_bias=has_relative_bias, dtype=dtype, rngs=rngs,
                                         rules=rules)
        self.layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, param_dtype=dtype)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        return x + self.SelfAttention(self.layer_norm(x), bias).astype(x.dtype)


class T5DenseGatedActDense(nnx.Module):
    """``wo(act(wi_0(x)) * wi_1(x))``."""

    def __init__(self, cfg: T5EncoderConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        lin = dict(use_bias=False, param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.act = _ACTS[cfg.dense_act_fn]
        self.wi_0 = Linear(cfg.d_model, cfg.d_ff, axes=("embed", "mlp"), **lin)
        self.wi_1 = Linear(cfg.d_model, cfg.d_ff, axes=("embed", "mlp"), **lin)
        self.wo = Linear(cfg.d_ff, cfg.d_model, axes=("mlp", "embed"), **lin)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5DenseActDense(nnx.Module):
    """``wo(act(wi(x)))`` (original T5, non-gated)."""

    def __init__(self, cfg: T5EncoderConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        lin = dict(use_bias=False, param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.act = _ACTS[cfg.dense_act_fn]
        self.wi = Linear(cfg.d_model, cfg.d_ff, axes=("embed", "mlp"), **lin)
        self.wo = Linear(cfg.d_ff, cfg.d_model, axes=("mlp", "embed"), **lin)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(self.act(self.wi(x)))


class T5LayerFF(nnx.Module):
    def __init__(self, cfg: T5EncoderConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        ff = T5DenseGatedActDense if cfg.is_gated_act else T5DenseActDense
        self.DenseReluDense = ff(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, param_dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.DenseReluDense(self.layer_norm(x)).astype(x.dtype)


class T5Block(nnx.Module):
    """``layer[0]``: self-attention sublayer, ``layer[1]``: feed-forward sublayer."""

    def __init__(self, cfg: T5EncoderConfig, *, has_relative_bias: bool, dtype: Dtype, rngs: nnx.Rngs,
                 rules: ShardingRules | None = None):
        self.layer = nnx.List([
            T5LayerSelfAttention(cfg, has_relative_bias=has_relative_bias, dtype=dtype, rngs=rngs, rules=rules),
            T5LayerFF(cfg, dtype=dtype, rngs=rngs),
        ])

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nnx.Module):
    def __init__(self, cfg: T5EncoderConfig, *, dtype: Dtype, rngs: nnx.Rngs, rules: ShardingRules | None = None):
        self.rules = rules
        self.block = nnx.List([T5Block(cfg, has_relative_bias=i == 0, dtype=dtype, rngs=rngs, rules=rules)
                               for i in range(cfg.num_layers)])
        self.final_layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, param_dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x: (B, S, D) embeddings; mask: (B, S) 1 = attend, or None -> (B, S, D)."""
        s = x.shape[1]
        bias = self.block[0].layer[0].SelfAttention.position_bias(s, s)  # shared by all blocks
        if mask is not None:
            neg = jnp.finfo(jnp.float32).min
            bias = bias + jnp.where(mask[:, None, None, :].astype(bool), 0.0, neg)
        for blk in self.block:
            x = shard(blk(x, bias), self.rules, "batch", "seq", "act_embed")
        return self.final_layer_norm(x)


class T5Encoder(nnx.Module):
    """transformers ``T5EncoderModel``; ``dtype`` is both the parameter and the compute dtype."""

    def __init__(self, cfg: T5EncoderConfig, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs,
                 rules: ShardingRules | None = None):
        self.config = cfg
        self.rules = rules
        self.shared = nnx.Embed(cfg.vocab_size, cfg.d_model, param_dtype=dtype, dtype=dtype, rngs=rngs,
                                embedding_metadata={"axes": ("vocab", "embed")})
        self.encoder = T5Stack(cfg, dtype=dtype, rngs=rngs, rules=rules)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids: (B, S) int -> last hidden state (B, S, d_model) in ``dtype``.

        ``attention_mask`` (B, S), 1 for real tokens; FLUX passes None (padding is attended to).
        """
        ids = shard(input_ids, self.rules, "batch", "seq")
        x = shard(self.shared(ids), self.rules, "batch", "seq", "act_embed")
        return self.encoder(x, attention_mask)
