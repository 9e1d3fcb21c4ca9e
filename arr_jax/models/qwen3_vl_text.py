"""Qwen3-VL language model in Flax NNX (text decoder with DeepStack visual injection).

Mirrors the Hugging Face module tree (``embed_tokens``, ``layers.N.self_attn.q_proj`` ...) so
weight conversion is a near-identity name map. Linear weights are stored as ``kernel`` with
shape ``(in, out)``; embeddings as ``embedding`` ``(vocab, embed)``; norms as ``weight``.

Features: grouped-query attention, RMSNorm on q and k per head, SwiGLU MLP, interleaved
multimodal RoPE (positions are ``(3, B, S)`` = temporal/height/width; frequency ``i`` takes its
position from axis ``0``, ``1`` or ``2`` as set by ``mrope_section``), and DeepStack: after
decoder layer ``i < K`` the ``i``-th visual feature map is added at the image-token positions.

Norms, softmax and RoPE run in float32; matmuls run in the parameter dtype.

The attention works with or without a KV cache (`cache_k`, `cache_v` of shape
``(L, B, T, KVH, D)``): new keys/values are written at ``cache_index`` and the queries attend
over the whole cache under the caller's boolean mask ``(B, S, T)``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arr_jax.nn.rope import inverse_frequencies_f32
from arr_jax.sharding import ShardingRules, shard

Array = jax.Array


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    attention_bias: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 262144  # the context limit: prompt + generated tokens

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "TextConfig":
        """From a ``text_config`` dict (transformers 4.x ``rope_scaling`` or 5.x ``rope_parameters``)."""
        rope = dict(d.get("rope_scaling") or {})
        rope.update(d.get("rope_parameters") or {})
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
            raise NotImplementedError(f"Qwen3-VL text rope_type {rope.get('rope_type')!r} is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"text hidden_act {d.get('hidden_act')!r} is not supported (only silu)")
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 5_000_000.0))),
            mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
            attention_bias=bool(d.get("attention_bias", False)),
            max_position_embeddings=int(d.get("max_position_embeddings") or 262144),
        )


# ----------------------------------------------------------------------------- layers


def _init(rngs: nnx.Rngs | None, shape, dtype, std=0.02):
    if rngs is None:
        return jnp.zeros(shape, dtype)
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """``y = x @ kernel + bias``; kernel ``(in, out)`` with logical ``axes``."""

    def __init__(self, din: int, dout: int, *, axes: tuple[str | None, str | None], bias: bool = True,
                 dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.kernel = nnx.Param(_init(rngs, (din, dout), dtype), axes=axes)
        self.bias = nnx.Param(jnp.zeros((dout,), dtype), axes=(axes[1],)) if bias else None

    def __call__(self, x: Array) -> Array:
        y = jnp.einsum("...i,io->...o", x.astype(self.kernel.dtype), self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Embed(nnx.Module):
    """Token embedding table ``(vocab, embed)``."""

    def __init__(self, num: int, dim: int, *, axes=("vocab", "embed"), dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.embedding = nnx.Param(_init(rngs, (num, dim), dtype), axes=axes)

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, cast back, then scaled (as Qwen does)."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), axes=("norm",))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with bias, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), axes=("norm",))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        mu = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
        y = (xf - mu) * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def rotate_half(x: Array) -> Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """``x``: ``(..., S, H, D)``; ``cos``/``sin``: ``(..., S, D)`` float32. Math in float32."""
    xf = x.astype(jnp.float32)
    c, s = cos[..., None, :], sin[..., None, :]
    return (xf * c + rotate_half(xf) * s).astype(x.dtype)


def attention(q: Array, k: Array, v: Array, mask: Array, scale: float) -> Array:
    """Grouped-query attention.

    q: ``(B, S, H, D)``; k, v: ``(B, T, KVH, D)``; mask: ``(B, S, T)`` bool (True = attend).
    Returns ``(B, S, H, D)``. Scores and softmax in float32.
    """
    b, s, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, s, kvh, h // kvh, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(b, s, h, d)


def mrope_axis_select(head_dim: int, section: Sequence[int]) -> np.ndarray:
    """For each of the ``head_dim // 2`` frequencies, which position axis (0=t, 1=h, 2=w) drives it.

    Interleaved layout: frequency ``i`` uses h when ``i % 3 == 1 and i < 3*section[1]``, w when
    ``i % 3 == 2 and i < 3*section[2]``, t otherwise.
    """
    sel = np.zeros(head_dim // 2, np.int32)
    sel[1:section[1] * 3:3] = 1
    sel[2:section[2] * 3:3] = 2
    return sel


def text_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """(head_dim // 2,) float32 RoPE inverse frequencies (`arr_jax.nn.rope.inverse_frequencies_f32`)."""
    return inverse_frequencies_f32(head_dim, theta)


def mrope_cos_sin(positions: Array, cfg: TextConfig) -> tuple[Array, Array]:
    """positions ``(3, B, S)`` int → cos, sin ``(B, S, head_dim)`` float32."""
    sel = mrope_axis_select(cfg.head_dim, cfg.mrope_section)
    inv = jnp.asarray(text_inv_freq(cfg.head_dim, cfg.rope_theta))
    pos = jnp.take(positions, jnp.asarray(sel), axis=0).astype(jnp.float32)  # (D/2, B, S)
    freqs = jnp.moveaxis(pos, 0, -1) * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


# ----------------------------------------------------------------------------- blocks


class Qwen3VLTextAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, rngs, rules: ShardingRules | None):
        e, h, kvh, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = Linear(e, h * d, axes=("embed", "heads"), bias=b, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(e, kvh * d, axes=("embed", "kv_heads"), bias=b, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(e, kvh * d, axes=("embed", "kv_heads"), bias=b, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(h * d, e, axes=("heads", "embed"), bias=b, dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.heads, self.kv_heads, self.head_dim = h, kvh, d
        self.rules = rules

    def __call__(self, x, cos, sin, mask, cache=None, layer: int = 0, cache_index=None, last_only: bool = False):
        """x ``(B, S, E)``; cache: optional stacked ``(k, v)`` each ``(L, B, T, KVH, D)``.

        New keys/values are written into layer ``layer`` of the cache at ``cache_index`` (in place
        under donation) and the queries attend over that layer's whole cache (at a static
        ``cache_index`` of 0, a prefill into an empty cache, over the ``S`` new keys only).
        With ``last_only`` keys and values still come from all ``S`` positions but only the last
        position queries (``mask`` keeps its ``(B, S, T)`` shape; its last row is used).
        Returns ``(out (B, S, E) or (B, 1, E) with last_only, cache)``.
        """
        b, s, _ = x.shape
        r = self.rules
        xq, cq, sq = (x[:, -1:], cos[:, -1:], sin[:, -1:]) if last_only else (x, cos, sin)
        q = self.q_norm(self.q_proj(xq).reshape(b, xq.shape[1], self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(b, s, self.kv_heads, self.head_dim))
        v = self.v_proj(x).reshape(b, s, self.kv_heads, self.head_dim)
        q, k = apply_rope(q, cq, sq), apply_rope(k, cos, sin)
        q = shard(q, r, "batch", "seq", "act_heads", None)
        if cache is not None:
            ck, cv = cache
            at = (layer, 0, cache_index, 0, 0)
            ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), at)
            cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), at)
            cache = (ck, cv)
            if isinstance(cache_index, int) and cache_index == 0:
                # a prefill into an empty cache: the keys are this call's own S (the slots after
                # them are empty and masked), so attend over those instead of the cache's T slots
                k, v = k.astype(ck.dtype), v.astype(cv.dtype)
                mask = mask[..., :s]
            else:
                k, v = ck[layer], cv[layer]
        k = shard(k, r, "batch", "seq", "act_heads", None)
        v = shard(v, r, "batch", "seq", "act_heads", None)
        if last_only:
            mask = mask[:, -1:]
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, self.head_dim ** -0.5)
        return self.o_proj(out.reshape(b, q.shape[1], self.heads * self.head_dim)), cache


class Qwen3VLTextMLP(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, rngs):
        e, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(e, f, axes=("embed", "mlp"), bias=False, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(e, f, axes=("embed", "mlp"), bias=False, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, e, axes=("mlp", "embed"), bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3VLTextDecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, rngs, rules):
        self.self_attn = Qwen3VLTextAttention(cfg, dtype, rngs, rules)
        self.mlp = Qwen3VLTextMLP(cfg, dtype, rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def __call__(self, x, cos, sin, mask, cache=None, layer: int = 0, cache_index=None, last_only: bool = False):
        """``(B, S, E) -> (B, S, E)``, or ``(B, 1, E)`` (the last position) with ``last_only``: the
        keys/values of all positions are still computed (and cached), the rest only for the last one."""
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, cache_index, last_only)
        if last_only:
            x = x[:, -1:]
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache


class Qwen3VLTextModel(nnx.Module):
    """Embedding, decoder stack and final norm (``model.language_model`` in HF)."""

    def __init__(self, cfg: TextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 rules: ShardingRules | None = None):
        self.cfg = cfg
        self.rules = rules
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Qwen3VLTextDecoderLayer(cfg, dtype, rngs, rules)
                                for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def __call__(self, embeds: Array, positions: Array, mask: Array, *,
                 visual_index: Array | None = None, deepstack: Array | None = None,
                 cache_k: Array | None = None, cache_v: Array | None = None,
                 cache_index: Array | int | None = None, last_only: bool = False):
        """Run the decoder.

        Args:
          embeds: ``(B, S, E)`` input embeddings (image features already scattered in).
          positions: ``(3, B, S)`` int32 multimodal RoPE positions.
          mask: ``(B, S, T)`` bool attention mask; ``T = S`` without a cache, cache length with one.
          visual_index: ``(B, S)`` int32 row of the visual features for image tokens, ``-1`` elsewhere.
          deepstack: ``(K, N_vis, E)`` features added after layers ``0..K-1`` at image tokens.
          cache_k, cache_v: ``(L, B, T, KVH, D)`` caches; written at ``cache_index``.
          last_only: only the last position's output is wanted (choice scoring, the prefill's next
            token): the last layer computes its keys/values for all positions (the cache needs them)
            and its queries, attention output, MLP and the final norm for the last position only,
            which skips nearly one layer's work out of ``L``; the result equals the last row of the
            full forward.

        Returns ``(hidden (B, S, E) after the final norm, or (B, 1, E) with last_only, cache_k,
        cache_v)`` (caches None without).
        """
        r = self.rules
        cos, sin = mrope_cos_sin(positions, self.cfg)
        x = shard(embeds, r, "batch", "seq", "act_embed")
        if deepstack is not None:
            vis_mask = (visual_index >= 0)[..., None]
            vis_rows = jnp.maximum(visual_index, 0)
        cache = None if cache_k is None else (cache_k, cache_v)
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            last = last_only and i == n - 1
            x, cache = layer(x, cos, sin, mask, cache, i, cache_index, last)
            if last and deepstack is not None:
                vis_mask, vis_rows = vis_mask[:, -1:], vis_rows[:, -1:]
            if deepstack is not None and i < deepstack.shape[0]:
                feat = jnp.take(deepstack[i], vis_rows, axis=0).astype(x.dtype)
                x = x + jnp.where(vis_mask, feat, jnp.zeros((), x.dtype))
            x = shard(x, r, "batch", "seq", "act_embed")
        x = self.norm(x)
        if cache is None:
            return x, None, None
        return x, cache[0], cache[1]
