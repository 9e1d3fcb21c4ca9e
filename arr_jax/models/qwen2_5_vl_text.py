"""Qwen2.5-VL language model in Flax NNX: the prefill that Qwen-Image's text encoder runs.

Mirrors the Hugging Face tree (``embed_tokens``, ``layers.N.self_attn.q_proj`` ..., ``norm``).
Shared with Qwen3-VL (`arr_jax.models.qwen3_vl_text`, imported, not repeated): the Linear,
Embed and RMSNorm layers, the grouped-query attention kernel, the rotate-half RoPE and the
`TextConfig` parser. Where Qwen2.5-VL differs from Qwen3-VL, this file says so:

* attention: q/k/v projections WITH bias, ``o_proj`` without; no RMSNorm on q and k;
* multimodal RoPE is NOT interleaved: the ``head_dim // 2`` frequencies are split into
  contiguous chunks ``mrope_section = (16, 24, 24)``; chunk 0 rotates by the temporal position,
  chunk 1 by the row, chunk 2 by the column (Qwen3-VL interleaves t/h/w frequency by frequency);
* no DeepStack injection; the decoder is a plain pre-norm stack.

Norms, softmax and RoPE in float32; matmuls in the parameter dtype. No KV cache: Qwen-Image only
reads the final hidden states of one prefill.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arr_jax.models.qwen3_vl_text import (Embed, Linear, RMSNorm, TextConfig, apply_rope, attention,
                                          text_inv_freq)
from arr_jax.sharding import ShardingRules, shard

Array = jax.Array


def mrope_chunk_select(head_dim: int, section: Sequence[int]) -> np.ndarray:
    """Position axis (0=t, 1=h, 2=w) of each of the ``head_dim // 2`` frequencies: contiguous chunks.

    ``section`` (16, 24, 24) -> frequencies 0..15 use t, 16..39 use h, 40..63 use w.
    """
    if sum(section) != head_dim // 2:
        raise ValueError(f"mrope_section {tuple(section)} must sum to head_dim // 2 = {head_dim // 2}")
    return np.repeat(np.arange(3), section).astype(np.int32)


def mrope_cos_sin(positions: Array, cfg: TextConfig) -> tuple[Array, Array]:
    """positions ``(3, B, S)`` int -> cos, sin ``(B, S, head_dim)`` float32 (frequencies repeated twice)."""
    sel = mrope_chunk_select(cfg.head_dim, cfg.mrope_section)
    inv = jnp.asarray(text_inv_freq(cfg.head_dim, cfg.rope_theta))
    pos = jnp.take(positions, jnp.asarray(sel), axis=0).astype(jnp.float32)  # (D/2, B, S)
    freqs = jnp.moveaxis(pos, 0, -1) * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class Qwen25VLAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, rngs, rules: ShardingRules | None):
        e, h, kvh, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(e, h * d, axes=("embed", "heads"), bias=True, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(e, kvh * d, axes=("embed", "kv_heads"), bias=True, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(e, kvh * d, axes=("embed", "kv_heads"), bias=True, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(h * d, e, axes=("heads", "embed"), bias=False, dtype=dtype, rngs=rngs)
        self.heads, self.kv_heads, self.head_dim, self.rules = h, kvh, d, rules

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array) -> Array:
        """x (B, S, E); cos/sin (B, S, head_dim); mask (B, S, S) bool -> (B, S, E)."""
        b, s, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(b, s, self.heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, s, self.kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, s, self.kv_heads, self.head_dim)
        q = shard(q, self.rules, "batch", "seq", "act_heads", None)
        k = shard(k, self.rules, "batch", "seq", "act_heads", None)
        v = shard(v, self.rules, "batch", "seq", "act_heads", None)
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, self.head_dim ** -0.5)
        return self.o_proj(out.reshape(b, s, self.heads * self.head_dim))


class Qwen2MLP(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, rngs):
        e, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(e, f, axes=("embed", "mlp"), bias=False, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(e, f, axes=("embed", "mlp"), bias=False, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, e, axes=("mlp", "embed"), bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen25VLDecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, rngs, rules):
        self.self_attn = Qwen25VLAttention(cfg, dtype, rngs, rules)
        self.mlp = Qwen2MLP(cfg, dtype, rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def __call__(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen25VLTextModel(nnx.Module):
    """Embedding, decoder stack and final norm (``model.language_model`` in HF)."""

    def __init__(self, cfg: TextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 rules: ShardingRules | None = None):
        self.cfg, self.rules = cfg, rules
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Qwen25VLDecoderLayer(cfg, dtype, rngs, rules) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def __call__(self, embeds: Array, positions: Array, mask: Array) -> Array:
        """embeds (B, S, E) (image features already scattered in), positions (3, B, S) int32, mask
        (B, S, S) bool (causal and padding) -> hidden states after the final norm (B, S, E)."""
        cos, sin = mrope_cos_sin(positions, self.cfg)
        x = shard(embeds, self.rules, "batch", "seq", "act_embed")
        for layer in self.layers:
            x = shard(layer(x, cos, sin, mask), self.rules, "batch", "seq", "act_embed")
        return self.norm(x)
