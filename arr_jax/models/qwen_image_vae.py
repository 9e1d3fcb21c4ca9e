"""The Qwen-Image VAE (diffusers ``AutoencoderKLQwenImage``, a fine-tuned Wan 2.1 video VAE) on still
images, in Flax NNX, NHWC inside and out.

The reference is a causal video VAE: every 3-D convolution pads time with ``2 * p_t`` zero frames
*before* the clip. A still image is one frame, so only the last temporal tap of each kernel ever
meets data; the others multiply zeros. We therefore keep 2-D kernels (the last tap, taken on load
by `arr_jax.convert.qwen_image_vae`), and the temporal resampling convolutions (``time_conv``),
which the reference skips on the first frame, are not part of this model.

Structure (names mirror diffusers so weight conversion is a near-identity)::

  encoder: conv_in -> down_blocks (flat list: residual blocks, resamplers)
           -> mid_block (resnet, attention, resnet) -> norm_out -> silu -> conv_out (2 z_dim: mean, logvar)
  quant_conv (1x1), post_quant_conv (1x1)
  decoder: conv_in -> mid_block -> up_blocks[i] (resnets, upsampler: nearest x2 + conv to half the
           channels) -> norm_out -> silu -> conv_out -> clamp to [-1, 1]

Norms are ``QwenImageRMS_norm``: the channel vector divided by its L2 norm (floor 1e-12), times
``sqrt(C) * gamma``; attention is one head over the H*W pixels. The transformer sees
``(z - latents_mean) / latents_std`` per channel (`scale_latents`); `unscale_latents` inverts it
as the pipeline does (``z / (1 / std) + mean``). Images are NHWC in [-1, 1]; float32 statistics.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from arr_jax.models.vae import Conv2d
from arr_jax.sharding import ShardingRules, shard

Dtype = Any


@dataclasses.dataclass(frozen=True)
class QwenImageVAEConfig:
    """The fields of a diffusers ``AutoencoderKLQwenImage`` config.json (defaults: Qwen-Image)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    input_channels: int = 3
    latents_mean: tuple[float, ...] = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                                       0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
    latents_std: tuple[float, ...] = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                                      3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

    @property
    def latent_channels(self) -> int:
        return self.z_dim

    def __post_init__(self):
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/std have {len(self.latents_mean)}/{len(self.latents_std)} entries, "
                             f"z_dim is {self.z_dim}")
        if self.attn_scales:
            raise ValueError(f"attn_scales={list(self.attn_scales)} is not supported (Qwen-Image has none, and "
                             f"diffusers' encoder cannot run attention inside its down blocks either)")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample {self.temperal_downsample} needs {len(self.dim_mult) - 1} "
                             f"entries for dim_mult {self.dim_mult}")

    @classmethod
    def from_dict(cls, d: dict) -> "QwenImageVAEConfig":
        """From a diffusers config dict; another class or a nonzero dropout is a ValueError."""
        name = d.get("_class_name", "AutoencoderKLQwenImage")
        if name != "AutoencoderKLQwenImage":
            raise ValueError(f"expected _class_name 'AutoencoderKLQwenImage', got {name!r}")
        if d.get("dropout", 0.0):
            raise ValueError(f"dropout={d['dropout']} is not supported (inference / frozen VAE only)")
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in d and d[f.name] is not None:
                v = d[f.name]
                kw[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**kw)


class RMSNormC(nnx.Module):
    """``QwenImageRMS_norm`` on NHWC: ``x / max(||x||_C, 1e-12) * sqrt(C) * gamma``; float32 math."""

    def __init__(self, channels: int, *, dtype: Dtype):
        self.gamma = nnx.Param(jnp.ones((channels,), dtype), axes=("norm",))
        self.scale = channels ** 0.5

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        y = xf / jnp.maximum(norm, 1e-12) * self.scale * self.gamma[...].astype(jnp.float32)
        return y.astype(x.dtype)


class ResidualBlock(nnx.Module):
    """``conv_shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`` (shortcut: 1x1 when widths differ)."""

    def __init__(self, in_ch: int, out_ch: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.norm1 = RMSNormC(in_ch, dtype=dtype)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1, dtype=dtype, rngs=rngs)
        self.norm2 = RMSNormC(out_ch, dtype=dtype)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1, dtype=dtype, rngs=rngs)
        self.conv_shortcut = Conv2d(in_ch, out_ch, 1, dtype=dtype, rngs=rngs) if in_ch != out_ch else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(jax.nn.silu(self.norm1(x)))
        x = self.conv2(jax.nn.silu(self.norm2(x)))
        return x + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the H*W pixels: ``norm``, 1x1 ``to_qkv``, softmax, 1x1 ``proj``, residual."""

    def __init__(self, ch: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.norm = RMSNormC(ch, dtype=dtype)
        self.to_qkv = Conv2d(ch, 3 * ch, 1, dtype=dtype, rngs=rngs)
        self.proj = Conv2d(ch, ch, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        q, k, v = jnp.split(self.to_qkv(self.norm(x)).reshape(b, h * w, 3 * c), 3, axis=-1)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bqk,bkc->bqc", probs, v).reshape(b, h, w, c)
        return x + self.proj(out)


class Resample(nnx.Module):
    """``resample`` = [pad-or-upsample, Conv2d] (index 1 holds the conv, as in diffusers' Sequential).

    down: zero pad bottom/right by one, 3x3 conv stride 2 (same width).
    up: nearest x2, 3x3 conv to half the width.
    """

    def __init__(self, ch: int, mode: str, *, dtype: Dtype, rngs: nnx.Rngs):
        if mode.startswith("down"):
            conv = Conv2d(ch, ch, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs)
        elif mode.startswith("up"):
            conv = Conv2d(ch, ch // 2, 3, padding=1, dtype=dtype, rngs=rngs)
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        self.up = mode.startswith("up")
        self.resample = nnx.List([None, conv])

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.up:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.resample[1](x)


class MidBlock(nnx.Module):
    def __init__(self, ch: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(ch, ch, dtype=dtype, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(ch, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class UpBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, num_res_blocks: int, upsample: bool, *, dtype: Dtype,
                 rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(in_ch if i == 0 else out_ch, out_ch, dtype=dtype, rngs=rngs)
                                 for i in range(num_res_blocks + 1)])
        self.upsamplers = nnx.List([Resample(out_ch, "up", dtype=dtype, rngs=rngs)]) if upsample else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nnx.Module):
    """(B, H, W, 3) -> (B, H/f, W/f, 2 z_dim) with f = 2^(len(dim_mult) - 1)."""

    def __init__(self, cfg: QwenImageVAEConfig, *, dtype: Dtype, rngs: nnx.Rngs, rules: ShardingRules | None):
        dims = [cfg.base_dim * u for u in (1,) + tuple(cfg.dim_mult)]
        self.rules = rules
        self.conv_in = Conv2d(cfg.input_channels, dims[0], 3, padding=1, dtype=dtype, rngs=rngs)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout, dtype=dtype, rngs=rngs))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(cout, "down", dtype=dtype, rngs=rngs))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], dtype=dtype, rngs=rngs)
        self.norm_out = RMSNormC(dims[-1], dtype=dtype)
        self.conv_out = Conv2d(dims[-1], 2 * cfg.z_dim, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = shard(blk(x), self.rules, "batch", None, None, None)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class Decoder(nnx.Module):
    """(B, h, w, z_dim) -> (B, h f, w f, 3), not yet clamped."""

    def __init__(self, cfg: QwenImageVAEConfig, *, dtype: Dtype, rngs: nnx.Rngs, rules: ShardingRules | None):
        mult = tuple(cfg.dim_mult)
        dims = [cfg.base_dim * u for u in (mult[-1],) + mult[::-1]]
        self.rules = rules
        self.conv_in = Conv2d(cfg.z_dim, dims[0], 3, padding=1, dtype=dtype, rngs=rngs)
        self.mid_block = MidBlock(dims[0], dtype=dtype, rngs=rngs)
        self.up_blocks = nnx.List([
            UpBlock(cin // 2 if i > 0 else cin, cout, cfg.num_res_blocks, i != len(mult) - 1, dtype=dtype, rngs=rngs)
            for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:]))])
        self.norm_out = RMSNormC(dims[-1], dtype=dtype)
        self.conv_out = Conv2d(dims[-1], cfg.input_channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            x = shard(blk(x), self.rules, "batch", None, None, None)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class QwenImageVAE(nnx.Module):
    """AutoencoderKLQwenImage on single frames. ``dtype`` is both the parameter and the compute dtype."""

    def __init__(self, cfg: QwenImageVAEConfig, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs,
                 rules: ShardingRules | None = None):
        self.config, self.dtype, self.rules = cfg, dtype, rules
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs, rules=rules)
        self.quant_conv = Conv2d(2 * cfg.z_dim, 2 * cfg.z_dim, 1, dtype=dtype, rngs=rngs)
        self.post_quant_conv = Conv2d(cfg.z_dim, cfg.z_dim, 1, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(cfg, dtype=dtype, rngs=rngs, rules=rules)

    @property
    def downsample_factor(self) -> int:
        return 2 ** len(self.config.temperal_downsample)

    def encode_moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images (B, H, W, C) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, z_dim) float32 (logvar clamped
        to [-30, 20] as diffusers' DiagonalGaussianDistribution does)."""
        x = shard(images.astype(self.dtype), self.rules, "batch", None, None, None)
        h = self.quant_conv(self.encoder(x)).astype(jnp.float32)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """images (B, H, W, C) -> raw latents (B, H/f, W/f, z_dim) float32: the posterior mean (the
        pipelines' ``argmax`` mode), or with ``rng`` a posterior sample. `scale_latents` them next."""
        mean, logvar = self.encode_moments(images)
        if rng is None:
            return mean
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, jnp.float32)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Raw latents (B, h, w, z_dim) -> images (B, h f, w f, C) float32 clamped to [-1, 1]."""
        z = shard(latents.astype(self.dtype), self.rules, "batch", None, None, None)
        x = self.decoder(self.post_quant_conv(z)).astype(jnp.float32)
        return jnp.clip(x, -1.0, 1.0)

    def scale_latents(self, z: jax.Array) -> jax.Array:
        """Raw latents -> the transformer's latent space: ``(z - mean) / std`` per channel."""
        mean = jnp.asarray(self.config.latents_mean, jnp.float32)
        std = jnp.asarray(self.config.latents_std, jnp.float32)
        return (z.astype(jnp.float32) - mean) / std

    def unscale_latents(self, z: jax.Array) -> jax.Array:
        """Inverse of `scale_latents`, rounded as the pipelines compute it: ``z / (1 / std) + mean``."""
        mean = jnp.asarray(self.config.latents_mean, jnp.float32)
        inv_std = 1.0 / jnp.asarray(self.config.latents_std, jnp.float32)
        return z.astype(jnp.float32) / inv_std + mean
