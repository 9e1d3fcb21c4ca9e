"""CLIP text transformer (transformers ``CLIPTextModel``) in Flax NNX: FLUX's ``text_encoder``.

``embeddings`` (token + learned absolute position) -> ``encoder.layers`` (pre-LN causal
self-attention and MLP with quick_gelu/gelu) -> ``final_layer_norm``. The pooled output is the
final hidden state at the end-of-text token: the argmax of the ids when the config's
``eos_token_id`` is the legacy value 2 (OpenAI CLIP, as FLUX ships it), else the first position
holding ``eos_token_id`` -- the rule transformers applies.

FLUX feeds ids padded to 77 tokens without an attention mask and uses only the pooled output.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from arr_jax.nn.layers import Linear
from arr_jax.sharding import ShardingRules, shard

Dtype = Any

_ACTS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Fields of a transformers ``CLIPTextConfig`` (defaults: openai/clip-vit-large-patch14 as in FLUX)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        if d.get("model_type", "clip_text_model") != "clip_text_model":
            raise ValueError(f"expected a CLIP text config (model_type 'clip_text_model'), "
                             f"got model_type={d.get('model_type')!r}")
        act = d.get("hidden_act", "quick_gelu")
        if act not in _ACTS:
            raise ValueError(f"CLIP hidden_act {act!r} is not supported; known: {sorted(_ACTS)}")
        if d["hidden_size"] % d["num_attention_heads"]:
            raise ValueError(f"hidden_size {d['hidden_size']} is not divisible by {d['num_attention_heads']} heads")
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
            max_position_embeddings=d.get("max_position_embeddings", 77), hidden_act=act,
            layer_norm_eps=d.get("layer_norm_eps", 1e-5), eos_token_id=d.get("eos_token_id", 2),
        )


class LayerNorm(nnx.Module):
    """torch ``LayerNorm`` over the last axis with ``weight``/``bias`` (D,); float32 statistics."""

    def __init__(self, dim: int, *, eps: float, dtype: Dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype), axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size,
                                         embedding_metadata={"axes": ("vocab", "embed")}, **kw)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                            embedding_metadata={"axes": (None, "embed")}, **kw)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """(B, S) int -> (B, S, D); positions are 0..S-1."""
        s = input_ids.shape[-1]
        pos = self.position_embedding.embedding[...][:s].astype(self.token_embedding.dtype)
        return self.token_embedding(input_ids) + pos[None]


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype: Dtype, rngs: nnx.Rngs, rules: ShardingRules | None = None):
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.rules = rules
        kw = dict(param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.q_proj = Linear(d, d, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(d, d, axes=("embed", "heads"), **kw)
        self.v_proj = Linear(d, d, axes=("embed", "heads"), **kw)
        self.out_proj = Linear(d, d, axes=("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """x: (B, S, D); bias: additive (1 or B, 1, S, S) float32 -> (B, S, D)."""
        b, s, d = x.shape
        h = self.num_heads

        def heads(t):
            return shard(t.reshape(b, s, h, d // h), self.rules, "batch", "seq", "act_heads", None)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (d // h) ** -0.5
        probs = jax.nn.softmax(logits + bias, axis=-1).astype(v.dtype)
        return self.out_proj(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, d))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.act = _ACTS[cfg.hidden_act]
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype: Dtype, rngs: nnx.Rngs, rules: ShardingRules | None = None):
        self.self_attn = CLIPAttention(cfg, dtype=dtype, rngs=rngs, rules=rules)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.mlp = CLIPMLP(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), bias).astype(x.dtype)
        return x + self.mlp(self.layer_norm2(x)).astype(x.dtype)


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype: Dtype, rngs: nnx.Rngs, rules: ShardingRules | None = None):
        self.rules = rules
        self.layers = nnx.List([CLIPEncoderLayer(cfg, dtype=dtype, rngs=rngs, rules=rules)
                                for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = shard(layer(x, bias), self.rules, "batch", "seq", "act_embed")
        return x


class CLIPTextModel(nnx.Module):
    """transformers ``CLIPTextModel``; ``dtype`` is both the parameter and the compute dtype."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs,
                 rules: ShardingRules | None = None):
        self.config = cfg
        self.rules = rules
        self.embeddings = CLIPTextEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, dtype=dtype, rngs=rngs, rules=rules)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        """input_ids: (B, S) int, S <= max_position_embeddings -> (last_hidden (B, S, D), pooled (B, D)).

        ``attention_mask`` (B, S), 1 = real token, is combined with the causal mask; FLUX passes None.
        """
        b, s = input_ids.shape
        if s > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {s} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        ids = shard(input_ids, self.rules, "batch", "seq")
        x = shard(self.embeddings(ids), self.rules, "batch", "seq", "act_embed")
        allowed = jnp.tril(jnp.ones((s, s), bool))[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :].astype(bool)
        bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
        hidden = self.final_layer_norm(self.encoder(x, bias))
        return hidden, hidden[jnp.arange(b), self.eos_positions(ids)]

    def eos_positions(self, input_ids: jax.Array) -> jax.Array:
        """(B, S) -> (B,) index of the end-of-text token, by transformers' rule (see module doc)."""
        if self.config.eos_token_id == 2:
            return jnp.argmax(input_ids, axis=-1)
        return jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
