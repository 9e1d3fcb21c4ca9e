"""The FLUX.1 rectified-flow transformer (MM-DiT) in Flax NNX.

Module attribute names mirror diffusers' ``FluxTransformer2DModel`` so that checkpoint
conversion (`arr_jax.convert.flux`) is an identity on names (Linear weights transposed).

Shapes: B batch, N image tokens (2x2-packed latents), L text tokens, D = heads * head_dim.

    img (B,N,in) --x_embedder--> (B,N,D) --+
    txt (B,L,joint) --context_embedder--> (B,L,D) --+--> 19 double-stream blocks (separate weights,
    temb = t_emb(1000 t) [+ g_emb(1000 g)] + text_embedder(pooled)   joint attention)
                                                  --> concat [txt; img] --> 38 single-stream blocks
                                                  --> img part --> norm_out (AdaLN) --> proj_out (B,N,out)
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from arr_jax.nn.attention import Attention
from arr_jax.nn.layers import (AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle, FeedForward,
                               Linear, MLPEmbedder, layer_norm, modulate, timestep_embedding)
from arr_jax.nn.lora import LoRAConfig, apply_lora
from arr_jax.nn.rope import rope_angles
from arr_jax.nn.remat import check_remat
from arr_jax.nn.stack import run_blocks, stack_blocks
from arr_jax.sharding import ShardingRules, param_shardings, shard

@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """Hyper-parameters of the Flux transformer (names as in diffusers' config.json)."""

    in_channels: int = 64
    out_channels: int | None = None  # None: same as in_channels
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = True
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    patch_size: int = 1
    mlp_ratio: float = 4.0
    rope_theta: float = 10000.0
    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32  # compute dtype of matmuls / residual stream
    lora: LoRAConfig | None = None
    attention_impl: str = "xla"  # see arr_jax.nn.attention.dot_product_attention
    # Rematerialise each block in the backward pass: False / "none", True / "full" (keep only the block
    # inputs), or "dots" (also keep every Linear output; recompute attention and elementwise work).
    remat: bool | str = False
    # Store each group of identical blocks stacked (`arr_jax.nn.stack.StackedBlocks`: weights (layers, ...))
    # and run it as one lax.scan: one block is compiled instead of 19 + 38, same numbers, no copy of the
    # weights in the program. Blocks whose structure differs (e.g. LoRA on some blocks only) stay a loop.
    scan_blocks: bool = False

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.patch_size ** 2 * (self.out_channels or self.in_channels)

    def __post_init__(self):
        check_remat(self.remat, "FluxConfig.remat")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                             f"{self.attention_head_dim}")

    def replace(self, **changes) -> "FluxConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_diffusers_config(cls, config: dict | str | os.PathLike, **overrides) -> "FluxConfig":
        """From a diffusers ``config.json`` (dict, file path or the directory holding it)."""
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                config = json.load(f)
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in config.items() if k in names and not k.startswith("_")}
        if "axes_dims_rope" in kw:
            kw["axes_dims_rope"] = tuple(kw["axes_dims_rope"])
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def flux_dev(cls, **overrides) -> "FluxConfig":
        """FLUX.1-dev: 19 double + 38 single blocks, 24 heads x 128, guidance-distilled."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "FluxConfig":
        """A 2+2-block, 2x16-head model for tests."""
        kw = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                  guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        kw.update(overrides)
        return cls(**kw)


def _kw(cfg: FluxConfig, rngs: nnx.Rngs) -> dict:
    return dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs)


class TimeTextEmbed(nnx.Module):
    """diffusers ``CombinedTimestep[Guidance]TextProjEmbeddings``: (B,), [(B,)], (B,P) -> temb (B, D).

    Inputs are already scaled to [0, 1000].
    """

    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.timestep_embedder = MLPEmbedder(256, d, **_kw(cfg, rngs))
        if cfg.guidance_embeds:
            self.guidance_embedder = MLPEmbedder(256, d, **_kw(cfg, rngs))
        self.text_embedder = MLPEmbedder(cfg.pooled_projection_dim, d, **_kw(cfg, rngs))
        self.has_guidance = cfg.guidance_embeds

    def __call__(self, timestep: jax.Array, guidance: jax.Array | None, pooled: jax.Array) -> jax.Array:
        temb = self.timestep_embedder(timestep_embedding(timestep, 256))
        if self.has_guidance:
            temb = temb + self.guidance_embedder(timestep_embedding(guidance, 256))
        return temb + self.text_embedder(pooled)


class FluxTransformerBlock(nnx.Module):
    """Double-stream block: separate AdaLN-zero / MLP weights per stream, joint attention."""

    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs, rules: ShardingRules | None = None):
        d, kw = cfg.inner_dim, _kw(cfg, rngs)
        self.dtype, self.rules = cfg.dtype, rules
        self.norm1 = AdaLayerNormZero(d, rules=rules, **kw)
        self.norm1_context = AdaLayerNormZero(d, rules=rules, **kw)
        self.attn = Attention(d, cfg.num_attention_heads, cfg.attention_head_dim, added_kv_dim=d,
                              impl=cfg.attention_impl, rules=rules, **kw)
        self.ff = FeedForward(d, d, mult=cfg.mlp_ratio, **kw)
        self.ff_context = FeedForward(d, d, mult=cfg.mlp_ratio, **kw)

    def __call__(self, img: jax.Array, txt: jax.Array, temb: jax.Array, rope):
        """img (B,N,D), txt (B,L,D), temb (B,D), rope (cos, sin) for L+N tokens -> (img, txt)."""
        x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(img, temb)
        c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(txt, temb)
        attn_img, attn_txt = self.attn(x, rope, context=c)

        img = img + gate_msa[:, None] * attn_img
        img = img + gate_mlp[:, None] * self.ff(modulate(layer_norm(img), shift_mlp, scale_mlp, self.dtype))
        txt = txt + c_gate_msa[:, None] * attn_txt
        txt = txt + c_gate_mlp[:, None] * self.ff_context(
            modulate(layer_norm(txt), c_shift_mlp, c_scale_mlp, self.dtype))
        img = shard(img, self.rules, "batch", "seq", "act_embed")
        txt = shard(txt, self.rules, "batch", "seq", "act_embed")
        return img, txt


class FluxSingleTransformerBlock(nnx.Module):
    """Single-stream block on [txt; img]: attention and MLP in parallel, one fused output projection."""

    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs, rules: ShardingRules | None = None):
        d, kw = cfg.inner_dim, _kw(cfg, rngs)
        mlp = int(d * cfg.mlp_ratio)
        self.dtype, self.rules = cfg.dtype, rules
        self.norm = AdaLayerNormZeroSingle(d, rules=rules, **kw)
        self.proj_mlp = Linear(d, mlp, axes=("embed", "mlp"), **kw)
        self.attn = Attention(d, cfg.num_attention_heads, cfg.attention_head_dim, pre_only=True,
                              impl=cfg.attention_impl, rules=rules, **kw)
        self.proj_out = Linear(d + mlp, d, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array, temb: jax.Array, rope) -> jax.Array:
        """x: (B, L+N, D), temb (B, D) -> (B, L+N, D)."""
        h, gate = self.norm(x, temb)
        mlp = jax.nn.gelu(self.proj_mlp(h), approximate=True)
        attn = self.attn(h, rope)
        x = x + gate[:, None] * self.proj_out(jnp.concatenate([attn, mlp], axis=-1))
        return shard(x, self.rules, "batch", "seq", "act_embed")


class FluxTransformer(nnx.Module):
    """FluxTransformer2DModel. See `__call__` for the inputs."""

    def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs, rules: ShardingRules | None = None):
        cfg = config
        self.config, self.rules = cfg, rules
        d, kw = cfg.inner_dim, _kw(cfg, rngs)
        self.time_text_embed = TimeTextEmbed(cfg, rngs=rngs)
        self.context_embedder = Linear(cfg.joint_attention_dim, d, axes=("channels", "embed"), **kw)
        self.x_embedder = Linear(cfg.in_channels, d, axes=("channels", "embed"), **kw)
        self.transformer_blocks = nnx.List(
            [FluxTransformerBlock(cfg, rngs=rngs, rules=rules) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nnx.List(
            [FluxSingleTransformerBlock(cfg, rngs=rngs, rules=rules) for _ in range(cfg.num_single_layers)])
        self.norm_out = AdaLayerNormContinuous(d, d, eps=1e-6, rules=rules, **kw)
        self.proj_out = Linear(d, cfg.out_dim, axes=("embed", "channels"), **kw)
        if cfg.lora is not None:
            apply_lora(self, cfg.lora, rngs=rngs)
        if cfg.scan_blocks:  # the scan-over-layers layout: each block group's weights stored stacked
            self.transformer_blocks = stack_blocks(self.transformer_blocks)
            self.single_transformer_blocks = stack_blocks(self.single_transformer_blocks)

    def __call__(self, img: jax.Array, txt: jax.Array, pooled: jax.Array, timestep: jax.Array,
                 img_ids: jax.Array, txt_ids: jax.Array, guidance: jax.Array | None = None) -> jax.Array:
        """Predict the flow velocity.

        img: (B, N, in_channels) packed latents; txt: (B, L, joint_attention_dim) T5 states;
        pooled: (B, pooled_projection_dim) CLIP pooled; timestep: (B,) sigma in [0, 1];
        img_ids: (N, 3), txt_ids: (L, 3) RoPE positions; guidance: (B,) scale (guidance_embeds only).
        Timestep and guidance are multiplied by 1000 here, as diffusers does.
        Returns (B, N, out_channels) in the compute dtype.
        """
        cfg, rules = self.config, self.rules
        if cfg.guidance_embeds and guidance is None:
            raise ValueError("this Flux model is guidance-distilled: pass `guidance`")
        if not cfg.guidance_embeds and guidance is not None:
            raise ValueError("this Flux model has no guidance embedding: do not pass `guidance`")
        n_txt = txt.shape[1]
        img = shard(self.x_embedder(img), rules, "batch", "seq", "act_embed")
        txt = shard(self.context_embedder(txt), rules, "batch", "seq", "act_embed")
        t = timestep.astype(jnp.float32) * 1000.0
        g = None if guidance is None else guidance.astype(jnp.float32) * 1000.0
        temb = self.time_text_embed(t, g, pooled)
        rope = rope_angles(jnp.concatenate([txt_ids, img_ids], axis=0), cfg.axes_dims_rope, cfg.rope_theta)

        img, txt = run_blocks(self.transformer_blocks, (img, txt), (temb, rope), remat=cfg.remat)
        x = jnp.concatenate([txt, img], axis=1)
        (x,) = run_blocks(self.single_transformer_blocks, (x,), (temb, rope), remat=cfg.remat)
        img = x[:, n_txt:]
        return self.proj_out(self.norm_out(img, temb))


def init_flux(config: FluxConfig, *, seed: int = 0, rules: ShardingRules | None = None) -> FluxTransformer:
    """A randomly initialised model, created by one jitted init directly on its shards."""
    make = lambda: FluxTransformer(config, rngs=nnx.Rngs(seed), rules=rules)
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = param_shardings(abstract, rules) if rules is not None and rules.mesh is not None else None
    state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)
