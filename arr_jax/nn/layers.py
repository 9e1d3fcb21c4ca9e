"""Shared building blocks: Linear (with optional LoRA), norms, feed-forward, embeddings.

Conventions:
  * Every parameter carries logical axis names in its ``axes`` metadata (see `arr_jax.sharding`).
  * Weights are stored in ``param_dtype``; matmuls run in the compute ``dtype``.
  * Normalisation statistics (LayerNorm, RMSNorm) are always computed in float32.
  * Module attribute names follow diffusers / transformers so checkpoint conversion
    is a near-identity mapping (torch ``weight`` of a Linear -> our ``kernel``, transposed).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arr_jax.sharding import ShardingRules, shard

Axes = tuple[str | None, ...]
Dtype = Any


def torch_linear_init(fan_in: int) -> Callable:
    """Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), the default init of ``torch.nn.Linear``."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Linear(nnx.Module):
    """``y = x @ kernel + bias`` with an optional low-rank adapter.

    kernel: (in_features, out_features) with axes ``axes``; bias: (out_features,).
    LoRA (attached by `arr_jax.nn.lora.apply_lora`) adds ``lora_scale * (x @ lora_a) @ lora_b``
    with lora_a: (in, rank), lora_b: (rank, out). Without LoRA, ``lora_a``/``lora_b`` are None.
    """

    def __init__(self, in_features: int, out_features: int, *, axes: Axes, use_bias: bool = True,
                 param_dtype: Dtype = jnp.float32, dtype: Dtype = jnp.float32, rngs: nnx.Rngs,
                 kernel_init: Callable | None = None):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        init = kernel_init or torch_linear_init(in_features)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype), axes=tuple(axes))
        if use_bias:
            b = torch_linear_init(in_features)(rngs.params(), (out_features,), param_dtype)
            self.bias = nnx.Param(b, axes=(axes[1],))
        else:
            self.bias = nnx.data(None)
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)
        self.lora_scale = 0.0

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (..., in_features) -> (..., out_features) in the compute dtype."""
        x = x.astype(self.dtype)
        y = jnp.matmul(x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None:
            y = y + lora_delta(x, self.lora_a[...].astype(self.dtype), self.lora_b[...].astype(self.dtype),
                               float(self.lora_scale))
        return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """The low-rank update ``scale * (x @ a) @ b`` in x's dtype; x: (..., in), a: (in, r), b: (r, out).

    Same numbers as the plain expression; only the backward is written out (see `_lora_delta_bwd`).
    """
    return (scale * jnp.matmul(jnp.matmul(x, a), b)).astype(x.dtype)


def _lora_delta_fwd(x, a, b, scale):
    low = jnp.matmul(x, a)
    return (scale * jnp.matmul(low, b)).astype(x.dtype), (x, a, b, low)


def _lora_delta_bwd(scale, res, g):
    """Gradients with the small (tokens x r) operand on the left of each token contraction.

    JAX's own transpose of ``low @ b`` computes ``db`` as ``(g^T @ low)^T``: the big cotangent ``g``
    (tokens x out) becomes the left operand of a contraction over tokens, and XLA's CPU matmul then
    materialises a transposed copy of it -- one per adapted layer and step, the largest single cost of
    the LoRA backward on CPU (issue 12's profile). Here ``db = low^T @ g`` and ``a``'s gradient is
    ``(dlow^T @ x)^T``: only the (tokens x r) operands are transposed.
    """
    x, a, b, low = res
    g = (g * scale).astype(g.dtype)
    lead = tuple(range(x.ndim - 1))
    last = x.ndim - 1
    dlow = jax.lax.dot_general(g, b, (((last,), (1,)), ((), ())))            # (..., r)
    db = jax.lax.dot_general(low, g, ((lead, lead), ((), ())))                 # (r, out)
    da = jax.lax.dot_general(dlow, x, ((lead, lead), ((), ()))).T             # (in, r)
    dx = jax.lax.dot_general(dlow, a, (((last,), (1,)), ((), ())))            # (..., in)
    return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm over the last axis without affine parameters, computed in float32; returns float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned scale ``weight`` (dim,); float32 statistics.

    Returns the input dtype.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, axes: Axes = ("norm",),
                 param_dtype: Dtype = jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=tuple(axes))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (xf * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def modulate(x_normed: jax.Array, shift: jax.Array, scale: jax.Array, dtype: Dtype) -> jax.Array:
    """``x * (1 + scale) + shift``; x: (B, S, D), shift/scale: (B, D)."""
    x = x_normed.astype(dtype)
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _modulation(linear: Linear, emb: jax.Array, dtype: Dtype, rules: ShardingRules | None) -> jax.Array:
    """``linear(silu(emb))``: (B, C) -> (B, k*D), constrained to batch sharding.

    The constraint matters for correctness, not just layout: without it XLA 0.10.2's SPMD
    partitioner mis-assigns batch shards when the batch is sharded over (data, fsdp) and the
    weights over (fsdp, tensor) (reproduced in tests/test_flux.py::test_sharded_forward...).
    """
    return shard(linear(jax.nn.silu(emb.astype(dtype))), rules, "batch", None)


class AdaLayerNormZero(nnx.Module):
    """adaLN-Zero with 6 modulation vectors (double-stream blocks).

    ``linear``: (D, 6D). Returns (normed+modulated x (B,S,D), gate_msa, shift_mlp, scale_mlp,
    gate_mlp), each vector (B, D).
    """

    def __init__(self, dim: int, *, param_dtype: Dtype, dtype: Dtype, rngs: nnx.Rngs,
                 rules: ShardingRules | None = None):
        self.dtype, self.rules = dtype, rules
        self.linear = Linear(dim, 6 * dim, axes=("embed", "mlp"), param_dtype=param_dtype, dtype=dtype,
                             rngs=rngs)

    def __call__(self, x: jax.Array, emb: jax.Array):
        mod = _modulation(self.linear, emb, self.dtype, self.rules)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        x = modulate(layer_norm(x), shift_msa, scale_msa, self.dtype)
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroSingle(nnx.Module):
    """adaLN-Zero with 3 modulation vectors (single-stream blocks). ``linear``: (D, 3D).

    Returns (normed+modulated x (B,S,D), gate (B,D)).
    """

    def __init__(self, dim: int, *, param_dtype: Dtype, dtype: Dtype, rngs: nnx.Rngs,
                 rules: ShardingRules | None = None):
        self.dtype, self.rules = dtype, rules
        self.linear = Linear(dim, 3 * dim, axes=("embed", "mlp"), param_dtype=param_dtype, dtype=dtype,
                             rngs=rngs)

    def __call__(self, x: jax.Array, emb: jax.Array):
        mod = _modulation(self.linear, emb, self.dtype, self.rules)
        shift, scale, gate = jnp.split(mod, 3, axis=-1)
        return modulate(layer_norm(x), shift, scale, self.dtype), gate


class AdaLayerNormContinuous(nnx.Module):
    """Final adaptive LayerNorm: ``linear``: (C, 2D) gives (scale, shift) -- note the order."""

    def __init__(self, dim: int, cond_dim: int, *, eps: float = 1e-6, param_dtype: Dtype, dtype: Dtype,
                 rngs: nnx.Rngs, rules: ShardingRules | None = None):
        self.dtype, self.rules = dtype, rules
        self.eps = eps
        self.linear = Linear(cond_dim, 2 * dim, axes=("embed", "mlp"), param_dtype=param_dtype, dtype=dtype,
                             rngs=rngs)

    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        """x: (B, S, D), cond: (B, C) -> (B, S, D)."""
        mod = _modulation(self.linear, cond, self.dtype, self.rules)
        scale, shift = jnp.split(mod, 2, axis=-1)
        return modulate(layer_norm(x, self.eps), shift, scale, self.dtype)


class GELUProj(nnx.Module):
    """``gelu_tanh(proj(x))`` -- diffusers' ``GELU(approximate="tanh")`` activation module."""

    def __init__(self, dim_in: int, dim_out: int, *, param_dtype: Dtype, dtype: Dtype, rngs: nnx.Rngs):
        self.proj = Linear(dim_in, dim_out, axes=("embed", "mlp"), param_dtype=param_dtype, dtype=dtype,
                           rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.proj(x), approximate=True)


class FeedForward(nnx.Module):
    """diffusers ``FeedForward(activation_fn="gelu-approximate")``: net = [GELUProj, (dropout), Linear].

    Index 1 (dropout, no parameters) is kept as ``None`` so parameter paths match
    ``ff.net.0.proj`` / ``ff.net.2``. x: (..., dim) -> (..., dim_out).
    """

    def __init__(self, dim: int, dim_out: int | None = None, *, mult: float = 4.0, param_dtype: Dtype,
                 dtype: Dtype, rngs: nnx.Rngs):
        inner = int(dim * mult)
        self.net = nnx.List([
            GELUProj(dim, inner, param_dtype=param_dtype, dtype=dtype, rngs=rngs),
            None,
            Linear(inner, dim_out or dim, axes=("mlp", "embed"), param_dtype=param_dtype, dtype=dtype,
                   rngs=rngs),
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


@functools.lru_cache(maxsize=None)
def timestep_frequencies(half: int, downscale_freq_shift: float = 0.0, max_period: float = 10000.0) -> np.ndarray:
    """The ``half`` frequencies of the sinusoidal embedding, ``(half,)`` float32, made on the host.

    ``freq_i = exp(-ln(max_period) * i / (half - downscale_freq_shift))``, with the exponent
    rounded to float32 step by step exactly as diffusers' ``get_timestep_embedding`` (and the
    original FLUX code) computes it, and the exponential taken in float64 and rounded once. A
    float32 ``exp`` on the device is off by an ulp for some entries (17 of 128 on XLA CPU), and at
    an argument like guidance 3.5 -> 3500 one ulp of a frequency moves the embedding by ~1e-4.
    The result is read-only (cached).
    """
    e = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    e = e / np.float32(half - downscale_freq_shift)
    freqs = np.exp(e.astype(np.float64)).astype(np.float32)
    freqs.setflags(write=False)
    return freqs


def timestep_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool = True,
                       downscale_freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, float32 (diffusers ``get_timestep_embedding``).

    t: (B,) -> (B, dim). ``flip_sin_to_cos=True`` puts cos first (as Flux does). The frequency
    table is a host constant (`timestep_frequencies`); arguments ``t * freq``, sin and cos are float32.
    """
    half = dim // 2
    freqs = jnp.asarray(timestep_frequencies(half, float(downscale_freq_shift), float(max_period)))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class MLPEmbedder(nnx.Module):
    """``linear_2(silu(linear_1(x)))``: diffusers ``TimestepEmbedding`` and
    ``PixArtAlphaTextProjection(act_fn="silu")`` share this structure. x: (B, in) -> (B, hidden)."""

    def __init__(self, in_dim: int, hidden: int, *, in_axis: str = "channels", param_dtype: Dtype,
                 dtype: Dtype, rngs: nnx.Rngs):
        self.linear_1 = Linear(in_dim, hidden, axes=(in_axis, "embed"), param_dtype=param_dtype, dtype=dtype,
                               rngs=rngs)
        self.linear_2 = Linear(hidden, hidden, axes=("embed", "mlp"), param_dtype=param_dtype, dtype=dtype,
                               rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))
