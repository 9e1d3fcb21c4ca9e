"""The Qwen-Image MM-DiT (diffusers ``QwenImageTransformer2DModel``) in Flax NNX.

Used by Qwen-Image (text-to-image), Qwen-Image-Edit and Qwen-Image-Edit-2509 (editing with one
or several source images). Module attribute names mirror diffusers, so checkpoint conversion
(`arr_jax.convert.qwen_image`) is an identity on names (Linear weights transposed).

Shapes: B batch, N image tokens (2x2-packed latents of the target image, then of every source
image), L text tokens (Qwen2.5-VL hidden states), D = heads * head_dim::

    img (B,N,in) --img_in--> (B,N,D)                          temb = MLP(sinusoid(1000 sigma)) (B,D)
    txt (B,L,joint) --txt_norm (RMS)--> txt_in --> (B,L,D)
        --> num_layers dual-stream blocks (separate AdaLN-zero / MLP weights per stream, joint
            attention over [txt; img] with QK-RMSNorm, a key mask for text padding, 3-axis RoPE)
        --> img part --> norm_out (AdaLN) --> proj_out (B, N, patch^2 * out_channels)

Unlike FLUX there are no single-stream blocks, no pooled text vector and no guidance embedding.

RoPE (diffusers ``QwenEmbedRope(scale_rope=True)``): each head's dims split into (frame, row,
col) chunks; consecutive pairs are rotated ("interleaved"), as in `arr_jax.nn.rope`. Image ``k``
(0 = the target, 1.. = the sources, in order) of ``h x w`` tokens has frame position ``k`` and
*centred* rows ``-(h - h//2) .. h//2 - 1`` and columns likewise; text token ``j`` has position
``m + j`` on all three axes, with ``m = max over images of max(h//2, w//2)`` (`qwen_rope_ids`).

``zero_cond_t`` (a newer edit variant's flag): source tokens are modulated with the embedding of
t = 0, target tokens with the real t; text and the output norm use the real t.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arr_jax.nn.attention import Attention
from arr_jax.nn.layers import AdaLayerNormContinuous, FeedForward, Linear, MLPEmbedder, RMSNorm, layer_norm
from arr_jax.nn.lora import LoRAConfig, apply_lora
from arr_jax.nn.remat import check_remat
from arr_jax.nn.stack import run_blocks, stack_blocks
from arr_jax.sharding import ShardingRules, param_shardings, shard


@dataclasses.dataclass(frozen=True)
class QwenImageConfig:
    """Hyper-parameters of the transformer (names as in diffusers' config.json)."""

    patch_size: int = 2
    in_channels: int = 64          # packed: 4 x VAE z_dim
    out_channels: int | None = 16  # None: in_channels
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584  # Qwen2.5-VL-7B hidden size
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    zero_cond_t: bool = False
    rope_theta: float = 10000.0
    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32       # compute dtype of matmuls / residual stream
    lora: LoRAConfig | None = None
    attention_impl: str = "xla"    # see arr_jax.nn.attention.dot_product_attention
    remat: bool | str = False      # per block in the backward pass: a bool or arr_jax.nn.remat.REMAT_MODES
    # Store the 60 blocks stacked (`arr_jax.nn.stack.StackedBlocks`) and run them as one lax.scan: one block
    # compiled instead of 60, same numbers, the weights read in place.
    scan_blocks: bool = False

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.patch_size ** 2 * (self.out_channels or self.in_channels)

    def __post_init__(self):
        check_remat(self.remat, "QwenImageConfig.remat")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                             f"{self.attention_head_dim}")
        if len(self.axes_dims_rope) != 3 or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope must be three even sizes, got {self.axes_dims_rope}")

    def replace(self, **changes) -> "QwenImageConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_diffusers_config(cls, config: dict | str | os.PathLike, **overrides) -> "QwenImageConfig":
        """From a diffusers ``config.json`` (dict, file or the folder holding it).

        Raises ValueError for another class or for variants we do not implement (guidance
        embedding, ``use_additional_t_cond`` / ``use_layer3d_rope`` of Qwen-Image-Layered).
        """
        where = "config"
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"no transformer config at {path}")
            where = path
            with open(path) as f:
                config = json.load(f)
        name = config.get("_class_name", "QwenImageTransformer2DModel")
        if name != "QwenImageTransformer2DModel":
            raise ValueError(f"{where}: _class_name {name!r} is not QwenImageTransformer2DModel")
        for flag in ("guidance_embeds", "use_additional_t_cond", "use_layer3d_rope"):
            if config.get(flag):
                raise ValueError(f"{where}: {flag}=true (a Qwen-Image variant we do not implement)")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in config.items() if k in names and not k.startswith("_")}
        if "axes_dims_rope" in kw:
            kw["axes_dims_rope"] = tuple(kw["axes_dims_rope"])
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def tiny(cls, **overrides) -> "QwenImageConfig":
        """A 2-block, 2x16-head model for tests."""
        kw = dict(in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
        kw.update(overrides)
        return cls(**kw)


# ---------------------------------------------------------------------------- positions

def qwen_rope_ids(img_shapes: Sequence[tuple[int, int, int]], txt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Position ids of diffusers' ``QwenEmbedRope(scale_rope=True)``.

    img_shapes: ``[(frames, h, w), ...]`` in token units (latent / 2), target first, then sources.
    Returns (img_ids (sum f*h*w, 3), txt_ids (txt_len, 3)), float32 (frame, row, col).
    """
    chunks, start = [], 0
    for k, (f, h, w) in enumerate(img_shapes):
        rows = np.arange(h) - (h - h // 2)
        cols = np.arange(w) - (w - w // 2)
        t, r, c = np.meshgrid(np.arange(k, k + f), rows, cols, indexing="ij")
        chunks.append(np.stack([t, r, c], -1).reshape(-1, 3))
        start = max(start, h // 2, w // 2)
    img = np.concatenate(chunks, 0) if chunks else np.zeros((0, 3))
    txt = np.repeat((start + np.arange(txt_len))[:, None], 3, axis=1)
    return img.astype(np.float32), txt.astype(np.float32)


def qwen_rope_angles(ids: jax.Array, axes_dims: Sequence[int], theta: float) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each (S, sum(axes_dims) // 2) float32, for ids (S, 3).

    Frequencies in float32 as diffusers computes them (``1 / theta ** (arange(0, d, 2) / d)``).
    """
    inv = np.concatenate([1.0 / np.power(np.float32(theta), np.arange(0, d, 2, dtype=np.float32) / np.float32(d))
                          for d in axes_dims]).astype(np.float32)
    axis_of_pair = np.repeat(np.arange(len(axes_dims)), [d // 2 for d in axes_dims])
    angles = ids.astype(jnp.float32)[:, axis_of_pair] * jnp.asarray(inv)[None, :]
    return jnp.cos(angles), jnp.sin(angles)


# ---------------------------------------------------------------------------- modules

def _kw(cfg: QwenImageConfig, rngs: nnx.Rngs) -> dict:
    return dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs)


def timestep_proj(sigma: jax.Array, dim: int = 256) -> jax.Array:
    """diffusers ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)``: (B,) -> (B, dim)
    float32 ``[cos, sin]`` of ``1000 * (sigma * freq_i)``, ``freq_i = exp(-ln(10^4) i / (dim / 2))``.

    The frequencies are made on the host, the exponent rounded to float32 step by step as diffusers
    computes it and the exponential taken in float64 and rounded once (a float32 ``exp`` on the
    device can be an ulp off); the scale multiplies the angles afterwards, as diffusers does.
    """
    half = dim // 2
    e = np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(e.astype(np.float64)).astype(np.float32)
    args = 1000.0 * (sigma.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :])
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class QwenTimestepProjEmbeddings(nnx.Module):
    """sigma (B,) -> `timestep_proj` (256) -> ``timestep_embedder`` MLP -> (B, D)."""

    def __init__(self, cfg: QwenImageConfig, *, rngs: nnx.Rngs):
        self.timestep_embedder = MLPEmbedder(256, cfg.inner_dim, **_kw(cfg, rngs))

    def __call__(self, sigma: jax.Array) -> jax.Array:
        return self.timestep_embedder(timestep_proj(sigma))


class QwenImageTransformerBlock(nnx.Module):
    """Dual-stream block: ``img_mod`` / ``txt_mod`` = [SiLU, Linear(D, 6D)] give (shift, scale, gate) for
    the attention and the MLP of each stream; one joint attention; ``img_mlp`` / ``txt_mlp``."""

    def __init__(self, cfg: QwenImageConfig, *, rngs: nnx.Rngs, rules: ShardingRules | None = None):
        d, kw = cfg.inner_dim, _kw(cfg, rngs)
        self.dtype, self.rules = cfg.dtype, rules
        self.img_mod = nnx.List([None, Linear(d, 6 * d, axes=("embed", "mlp"), **kw)])
        self.txt_mod = nnx.List([None, Linear(d, 6 * d, axes=("embed", "mlp"), **kw)])
        self.attn = Attention(d, cfg.num_attention_heads, cfg.attention_head_dim, added_kv_dim=d,
                              impl=cfg.attention_impl, rules=rules, **kw)
        self.img_mlp = FeedForward(d, d, **kw)
        self.txt_mlp = FeedForward(d, d, **kw)

    def _mod(self, linear: Linear, temb: jax.Array) -> list[jax.Array]:
        """(B, D) -> [shift1, scale1, gate1, shift2, scale2, gate2], each (B, D)."""
        mod = shard(linear(jax.nn.silu(temb.astype(self.dtype))), self.rules, "batch", None)
        return jnp.split(mod, 6, axis=-1)

    def __call__(self, img, txt, temb, rope, txt_mask=None, temb_cond=None, is_cond=None):
        """img (B,N,D), txt (B,L,D), temb (B,D), rope (cos, sin) for L+N tokens, txt_mask (B,L) bool or None.

        With ``temb_cond`` (B,D) and ``is_cond`` (N,) bool, image tokens marked ``is_cond`` take
        their modulation from ``temb_cond`` (zero_cond_t). Returns (img, txt).
        """
        im = self._mod(self.img_mod[1], temb)
        if temb_cond is not None:
            imc = self._mod(self.img_mod[1], temb_cond)
            sel = is_cond[None, :, None]
            im = [jnp.where(sel, c[:, None], m[:, None]) for m, c in zip(im, imc)]
        else:
            im = [m[:, None] for m in im]
        tm = [m[:, None] for m in self._mod(self.txt_mod[1], temb)]

        def mod(x, shift, scale):  # x * (1 + scale) + shift on the float32 LayerNorm output
            return layer_norm(x).astype(self.dtype) * (1 + scale) + shift

        attn_img, attn_txt = self.attn(mod(img, im[0], im[1]), rope, context=mod(txt, tm[0], tm[1]),
                                       context_mask=txt_mask)
        img = img + im[2] * attn_img
        txt = txt + tm[2] * attn_txt
        img = img + im[5] * self.img_mlp(mod(img, im[3], im[4]))
        txt = txt + tm[5] * self.txt_mlp(mod(txt, tm[3], tm[4]))
        img = shard(img, self.rules, "batch", "seq", "act_embed")
        txt = shard(txt, self.rules, "batch", "seq", "act_embed")
        return img, txt


class QwenImageTransformer(nnx.Module):
    """QwenImageTransformer2DModel. See `__call__` for the inputs."""

    def __init__(self, config: QwenImageConfig, *, rngs: nnx.Rngs, rules: ShardingRules | None = None):
        cfg = config
        self.config, self.rules = cfg, rules
        d, kw = cfg.inner_dim, _kw(cfg, rngs)
        self.time_text_embed = QwenTimestepProjEmbeddings(cfg, rngs=rngs)
        self.txt_norm = RMSNorm(cfg.joint_attention_dim, eps=1e-6, param_dtype=cfg.param_dtype)
        self.img_in = Linear(cfg.in_channels, d, axes=("channels", "embed"), **kw)
        self.txt_in = Linear(cfg.joint_attention_dim, d, axes=("channels", "embed"), **kw)
        self.transformer_blocks = nnx.List(
            [QwenImageTransformerBlock(cfg, rngs=rngs, rules=rules) for _ in range(cfg.num_layers)])
        self.norm_out = AdaLayerNormContinuous(d, d, eps=1e-6, rules=rules, **kw)
        self.proj_out = Linear(d, cfg.out_dim, axes=("embed", "channels"), **kw)
        if cfg.lora is not None:
            apply_lora(self, cfg.lora, rngs=rngs)
        if cfg.scan_blocks:
            self.transformer_blocks = stack_blocks(self.transformer_blocks)

    def __call__(self, img: jax.Array, txt: jax.Array, timestep: jax.Array, img_ids: jax.Array,
                 txt_ids: jax.Array, txt_mask: jax.Array | None = None, n_target: int | None = None) -> jax.Array:
        """Predict the flow velocity.

        img: (B, N, in_channels) packed latents (target tokens first, then the sources');
        txt: (B, L, joint_attention_dim) text-encoder hidden states; timestep: (B,) sigma in [0, 1];
        img_ids (N, 3), txt_ids (L, 3): positions from `qwen_rope_ids`; txt_mask: (B, L) bool
        (False = padding) or None (all valid); n_target: the number of target tokens (needed only
        with ``zero_cond_t``). Returns (B, N, out_dim) in the compute dtype.
        """
        cfg, rules = self.config, self.rules
        img = shard(self.img_in(img), rules, "batch", "seq", "act_embed")
        txt = shard(self.txt_in(self.txt_norm(txt)), rules, "batch", "seq", "act_embed")
        sigma = timestep.astype(jnp.float32)
        temb = self.time_text_embed(sigma).astype(cfg.dtype)
        temb_cond = is_cond = None
        if cfg.zero_cond_t:
            if n_target is None:
                raise ValueError("this Qwen-Image model has zero_cond_t: pass n_target (target image tokens)")
            temb_cond = self.time_text_embed(jnp.zeros_like(sigma)).astype(cfg.dtype)
            is_cond = jnp.arange(img.shape[1]) >= n_target
        rope = qwen_rope_angles(jnp.concatenate([txt_ids, img_ids], axis=0), cfg.axes_dims_rope, cfg.rope_theta)
        mask = None if txt_mask is None else txt_mask.astype(bool)

        img, txt = run_blocks(self.transformer_blocks, (img, txt), (temb, rope, mask, temb_cond, is_cond),
                              remat=cfg.remat)
        return self.proj_out(self.norm_out(img, temb))


def init_qwen_image(config: QwenImageConfig, *, seed: int = 0,
                    rules: ShardingRules | None = None) -> QwenImageTransformer:
    """A randomly initialised model, created by one jitted init directly on its shards."""
    make = lambda: QwenImageTransformer(config, rngs=nnx.Rngs(seed), rules=rules)  # noqa: E731
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = param_shardings(abstract, rules) if rules is not None and rules.mesh is not None else None
    state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)
