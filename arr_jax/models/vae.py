"""FLUX's AutoencoderKL (diffusers ``AutoencoderKL``) in Flax NNX, NHWC inside and out.

Structure (names mirror diffusers so weight conversion is a near-identity):

  encoder: conv_in -> down_blocks[i] (resnets, downsamplers) -> mid_block -> conv_norm_out
           -> silu -> conv_out  => (B, h, w, 2 * latent_channels) = (mean, logvar)
  decoder: conv_in -> mid_block -> up_blocks[i] (resnets, upsamplers) -> conv_norm_out
           -> silu -> conv_out  => (B, H, W, out_channels)
  mid_block: resnets[0] -> attentions[0] (single-head self-attention over H*W) -> resnets[1]

FLUX uses 16 latent channels, no quant convs, ``scaling_factor`` 0.3611 and ``shift_factor``
0.1159: the transformer sees ``(z - shift) * scale`` (`scale_latents`), and the decoder gets
``z / scale + shift`` back (`unscale_latents`).

Images are NHWC in [-1, 1]. GroupNorm statistics and the attention softmax run in float32.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from arr_jax.nn.layers import Linear, torch_linear_init
from arr_jax.sharding import ShardingRules, shard

Dtype = Any
Padding = tuple[tuple[int, int], tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of a diffusers ``AutoencoderKL`` config.json that the math depends on."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    act_fn: str = "silu"
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        """Build from a diffusers config dict; unsupported variants raise ValueError."""
        name = d.get("_class_name", "AutoencoderKL")
        if name != "AutoencoderKL":
            raise ValueError(f"expected a diffusers AutoencoderKL config, got _class_name={name!r}")
        n = len(d.get("block_out_channels", cls.block_out_channels))
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = list(d.get(key, [want] * n))
            if types != [want] * n:
                raise ValueError(f"AutoencoderKL {key}={types} is not supported (only {want} x {n})")
        if d.get("act_fn", "silu") not in ("silu", "swish"):
            raise ValueError(f"AutoencoderKL act_fn={d['act_fn']!r} is not supported (only silu)")
        if d.get("latents_mean") is not None or d.get("latents_std") is not None:
            raise ValueError("AutoencoderKL with latents_mean/latents_std is not supported (FLUX uses shift/scale)")
        shift = d.get("shift_factor")
        return cls(
            in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
            block_out_channels=tuple(d.get("block_out_channels", cls.block_out_channels)),
            layers_per_block=d.get("layers_per_block", 1), latent_channels=d.get("latent_channels", 4),
            norm_num_groups=d.get("norm_num_groups", 32), act_fn="silu",
            scaling_factor=float(d.get("scaling_factor", 0.18215)),
            shift_factor=0.0 if shift is None else float(shift),
            use_quant_conv=bool(d.get("use_quant_conv", True)),
            use_post_quant_conv=bool(d.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(d.get("mid_block_add_attention", True)),
        )


class Conv2d(nnx.Module):
    """NHWC convolution; ``kernel``: (kh, kw, in, out) (torch OIHW transposed), ``bias``: (out,)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1,
                 padding: int | Padding = 0, dtype: Dtype, rngs: nnx.Rngs):
        init = torch_linear_init(in_ch * kernel_size * kernel_size)
        self.kernel = nnx.Param(init(rngs.params(), (kernel_size, kernel_size, in_ch, out_ch), dtype),
                                axes=(None, None, "channels", "channels"))
        self.bias = nnx.Param(init(rngs.params(), (out_ch,), dtype), axes=("channels",))
        self.stride = stride
        self.padding = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, in) -> (B, H', W', out)."""
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.stride, self.stride),
            self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
    """torch ``GroupNorm`` on NHWC input with affine ``weight``/``bias`` (C,); float32 statistics."""

    def __init__(self, num_groups: int, channels: int, *, eps: float = 1e-6, dtype: Dtype):
        if channels % num_groups:
            raise ValueError(f"GroupNorm: {channels} channels do not split into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((channels,), dtype), axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((channels,), dtype), axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C) -> same shape and dtype."""
        b, h, w, c = x.shape
        xf = x.astype(jnp.float32).reshape(b, h, w, self.num_groups, c // self.num_groups)
        mean = jnp.mean(xf, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=(1, 2, 4), keepdims=True)
        xf = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        y = xf * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class ResnetBlock2D(nnx.Module):
    """``norm1 -> silu -> conv1 -> norm2 -> silu -> conv2`` plus a (1x1 conv) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, *, groups: int, dtype: Dtype, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(groups, in_ch, dtype=dtype)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1, dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(groups, out_ch, dtype=dtype)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1, dtype=dtype, rngs=rngs)
        self.conv_shortcut = (Conv2d(in_ch, out_ch, 1, dtype=dtype, rngs=rngs) if in_ch != out_ch
                              else nnx.data(None))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, in) -> (B, H, W, out)."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv after padding one zero row/column at the bottom/right (diffusers padding=0)."""

    def __init__(self, ch: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.conv = Conv2d(ch, ch, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H // 2, W // 2, C)."""
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2 upsampling, then a 3x3 conv."""

    def __init__(self, ch: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.conv = Conv2d(ch, ch, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, 2H, 2W, C)."""
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class Attention(nnx.Module):
    """diffusers' VAE mid-block attention: GroupNorm, one head of width C over the H*W tokens,
    ``to_out.0`` projection and a residual connection."""

    def __init__(self, ch: int, *, groups: int, dtype: Dtype, rngs: nnx.Rngs):
        self.group_norm = GroupNorm(groups, ch, dtype=dtype)
        lin = dict(axes=("channels", "channels"), param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.to_q = Linear(ch, ch, **lin)
        self.to_k = Linear(ch, ch, **lin)
        self.to_v = Linear(ch, ch, **lin)
        self.to_out = nnx.List([Linear(ch, ch, **lin)])

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C) -> same."""
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = self.to_out[0](jnp.einsum("bqk,bkc->bqc", probs, v))
        return x + out.reshape(b, h, w, c).astype(x.dtype)


class UNetMidBlock2D(nnx.Module):
    """``resnets[0] -> attentions[0] -> resnets[1]`` at the lowest resolution."""

    def __init__(self, ch: int, *, groups: int, add_attention: bool, dtype: Dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(ch, ch, groups=groups, dtype=dtype, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([Attention(ch, groups=groups, dtype=dtype, rngs=rngs) if add_attention
                                    else None])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions[0] is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, *, num_layers: int, groups: int, add_downsample: bool,
                 dtype: Dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, groups=groups, dtype=dtype,
                                               rngs=rngs) for i in range(num_layers)])
        self.downsamplers = (nnx.List([Downsample2D(out_ch, dtype=dtype, rngs=rngs)]) if add_downsample
                             else nnx.data(None))

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, *, num_layers: int, groups: int, add_upsample: bool,
                 dtype: Dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, groups=groups, dtype=dtype,
                                               rngs=rngs) for i in range(num_layers)])
        self.upsamplers = (nnx.List([Upsample2D(out_ch, dtype=dtype, rngs=rngs)]) if add_upsample
                           else nnx.data(None))

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nnx.Module):
    """(B, H, W, in_channels) -> (B, H / 2^(n-1), W / 2^(n-1), 2 * latent_channels)."""

    def __init__(self, cfg: VAEConfig, *, dtype: Dtype, rngs: nnx.Rngs, rules: ShardingRules | None = None):
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.rules = rules
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], num_layers=cfg.layers_per_block, groups=g,
                               add_downsample=i < len(ch) - 1, dtype=dtype, rngs=rngs)
            for i in range(len(ch))])
        self.mid_block = UNetMidBlock2D(ch[-1], groups=g, add_attention=cfg.mid_block_add_attention, dtype=dtype,
                                        rngs=rngs)
        self.conv_norm_out = GroupNorm(g, ch[-1], dtype=dtype)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = shard(blk(x), self.rules, "batch", None, None, None)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """(B, h, w, latent_channels) -> (B, h * 2^(n-1), w * 2^(n-1), out_channels)."""

    def __init__(self, cfg: VAEConfig, *, dtype: Dtype, rngs: nnx.Rngs, rules: ShardingRules | None = None):
        rev, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.rules = rules
        self.conv_in = Conv2d(cfg.latent_channels, rev[0], 3, padding=1, dtype=dtype, rngs=rngs)
        self.mid_block = UNetMidBlock2D(rev[0], groups=g, add_attention=cfg.mid_block_add_attention, dtype=dtype,
                                        rngs=rngs)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], num_layers=cfg.layers_per_block + 1, groups=g,
                             add_upsample=i < len(rev) - 1, dtype=dtype, rngs=rngs)
            for i in range(len(rev))])
        self.conv_norm_out = GroupNorm(g, rev[-1], dtype=dtype)
        self.conv_out = Conv2d(rev[-1], cfg.out_channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            x = shard(blk(x), self.rules, "batch", None, None, None)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """The FLUX VAE. ``dtype`` is both the parameter and the compute dtype."""

    def __init__(self, cfg: VAEConfig, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs,
                 rules: ShardingRules | None = None):
        self.config = cfg
        self.dtype = dtype
        self.rules = rules
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs, rules=rules)
        self.decoder = Decoder(cfg, dtype=dtype, rngs=rngs, rules=rules)
        zc = cfg.latent_channels
        self.quant_conv = (Conv2d(2 * zc, 2 * zc, 1, dtype=dtype, rngs=rngs) if cfg.use_quant_conv
                           else nnx.data(None))
        self.post_quant_conv = (Conv2d(zc, zc, 1, dtype=dtype, rngs=rngs) if cfg.use_post_quant_conv
                                else nnx.data(None))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode_moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images: (B, H, W, C) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent_channels) float32.

        ``logvar`` is clamped to [-30, 20] as in diffusers' DiagonalGaussianDistribution.
        """
        x = shard(images.astype(self.dtype), self.rules, "batch", None, None, None)
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        h = h.astype(jnp.float32)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """images (B, H, W, C) -> raw latents (B, H/f, W/f, latent_channels) float32.

        Without ``rng``: the posterior mean. With ``rng``: a posterior sample ``mean + std * eps``.
        Apply `scale_latents` before handing them to the transformer.
        """
        mean, logvar = self.encode_moments(images)
        if rng is None:
            return mean
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, jnp.float32)

    def decode(self, latents: jax.Array) -> jax.Array:
        """raw latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels) float32 in ~[-1, 1].

        Apply `unscale_latents` first to latents that came from the transformer.
        """
        z = shard(latents.astype(self.dtype), self.rules, "batch", None, None, None)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def scale_latents(self, z: jax.Array) -> jax.Array:
        """Raw VAE latents -> the transformer's latent space: ``(z - shift) * scale``."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, z: jax.Array) -> jax.Array:
        """Inverse of `scale_latents`: ``z / scale + shift``."""
        return z / self.config.scaling_factor + self.config.shift_factor
