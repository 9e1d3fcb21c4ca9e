"""Qwen3-VL vision encoder in Flax NNX.

The processor emits flat patches ``(N, C*T*P*P)``, each image's patches in spatial-merge-block
order (``m x m`` neighbouring patches contiguous). We pack them one frame per row,
``(G, L, C*T*P*P)``, zero-padded to a common bucketed length ``L`` (`vision_aux`, `pack_patches`),
so attention is a batched ``(G, L, L)`` problem with a key-length mask instead of a block-diagonal
mask over all patches. The model:

  1. ``patch_embed``: the 3-D conv with stride = kernel is a linear map of each flat patch;
  2. adds a learned ``(side x side)`` position table bilinearly resampled (align_corners) to the
     image grid, and uses a 2-D rotary embedding (h and w positions over halves of the head dim);
  3. runs ``depth`` pre-LN ViT blocks, each frame attending only to its own real patches;
  4. ``merger``: LayerNorm, then each ``m*m`` block is concatenated and projected by an MLP to the
     language model width; ``deepstack_merger_list[j]`` does the same (LayerNorm after the
     concatenation) on the output of block ``deepstack_visual_indexes[j]``.

Everything that depends only on ``grid_thw`` (interpolation taps, rotary positions, lengths) is
computed on the host in numpy by `vision_aux`, so the jitted encoder has static shapes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arr_jax.models.qwen3_vl_text import Embed, LayerNorm, Linear, apply_rope
from arr_jax.nn.rope import inverse_frequencies_f32
from arr_jax.sharding import ShardingRules, shard

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 4096
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "VisionConfig":
        rope = dict(d.get("rope_parameters") or {})
        if rope.get("rope_type", "axial") != "axial":
            raise NotImplementedError(f"vision rope_type {rope.get('rope_type')!r} is not supported")
        if d.get("hidden_act", "gelu_pytorch_tanh") not in _ACTS:
            raise NotImplementedError(f"vision hidden_act {d.get('hidden_act')!r} is not supported")
        f = {k: d[k] for k in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels",
                               "patch_size", "temporal_patch_size", "spatial_merge_size", "out_hidden_size",
                               "num_position_embeddings", "hidden_act") if k in d}
        if "deepstack_visual_indexes" in d:
            f["deepstack_visual_indexes"] = tuple(d["deepstack_visual_indexes"])
        f["rope_theta"] = float(rope.get("rope_theta", 10000.0))
        return cls(**f)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


_ACTS = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


# ----------------------------------------------------------------------------- host-side geometry


def _block_order_rc(h: int, w: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each patch of an ``h x w`` grid listed in ``m x m`` block order."""
    r = np.arange(h).reshape(h // m, m, 1, 1)
    c = np.arange(w).reshape(1, 1, w // m, m)
    rows = np.broadcast_to(r, (h // m, m, w // m, m)).transpose(0, 2, 1, 3).reshape(-1)
    cols = np.broadcast_to(c, (h // m, m, w // m, m)).transpose(0, 2, 1, 3).reshape(-1)
    return rows, cols


def _bilinear_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Two taps and weights per target index (``align_corners=True``, border clamp)."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    fl = np.floor(src)
    offs = np.arange(2)
    taps = np.clip(fl.astype(np.int64)[:, None] + offs, 0, side - 1)
    wts = np.clip(1.0 - np.abs(src[:, None] - fl[:, None] - offs), 0.0, None).astype(np.float32)
    return taps, wts


def vision_aux(grid_thw: np.ndarray | Sequence[Sequence[int]], cfg: VisionConfig,
               patch_bucket: int | None = None, frame_bucket: int | None = None) -> dict[str, np.ndarray]:
    """Per-patch static inputs for `Qwen3VLVisionModel` (numpy), one row per frame.

    Each image (or frame) is a row of ``L`` patches: its ``h * w`` patches first, then padding,
    with ``L`` = the largest frame rounded up to a multiple of ``patch_bucket`` (default: of
    ``merge^2``); the row count ``G`` is rounded up to a multiple of ``frame_bucket``.

    Returns ``pos_index (G, L, 4)`` / ``pos_weight (G, L, 4)`` (bilinear taps into the learned
    table), ``rope_pos (G, L, 2)`` (h, w patch coordinates) and ``patch_len (G,)`` (real patches
    per row; 0 for padding rows).
    """
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    m, side = cfg.spatial_merge_size, int(cfg.num_position_embeddings ** 0.5)
    frames = []
    for t, h, w in grid.tolist():
        if h % m or w % m:
            raise ValueError(f"grid {h}x{w} is not divisible by the spatial merge size {m}")
        rows, cols = _block_order_rc(h, w, m)
        ht, hw = _bilinear_taps(rows, h, side)
        wt, ww = _bilinear_taps(cols, w, side)
        i4 = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
        w4 = (hw[:, :, None] * ww[:, None, :]).reshape(-1, 4)
        frames += [(i4, w4, np.stack([rows, cols], -1))] * t
    step = int(np.lcm(patch_bucket or 1, m * m))
    longest = max((f[0].shape[0] for f in frames), default=0)
    length = max(-(-longest // step) * step, step)
    g = len(frames) if not frame_bucket else max(-(-len(frames) // frame_bucket) * frame_bucket, frame_bucket)
    out = {"pos_index": np.zeros((g, length, 4), np.int32), "pos_weight": np.zeros((g, length, 4), np.float32),
           "rope_pos": np.zeros((g, length, 2), np.int32), "patch_len": np.zeros((g,), np.int32)}
    for j, (i4, w4, rc) in enumerate(frames):
        n = i4.shape[0]
        out["pos_index"][j, :n], out["pos_weight"][j, :n], out["rope_pos"][j, :n] = i4, w4, rc
        out["patch_len"][j] = n
    return out


def pack_patches(pixel_values: np.ndarray, aux: dict[str, np.ndarray]) -> np.ndarray:
    """Flat processor patches ``(N, D)`` → per-frame rows ``(G, L, D)`` (zero padded) for `aux`."""
    pv = np.asarray(pixel_values, np.float32)
    lens = aux["patch_len"]
    if int(lens.sum()) != pv.shape[0]:
        raise ValueError(f"{pv.shape[0]} pixel patches but image_grid_thw describes {int(lens.sum())}")
    out = np.zeros(aux["pos_index"].shape[:2] + pv.shape[1:], np.float32)
    start = 0
    for j, n in enumerate(lens.tolist()):
        out[j, :n] = pv[start:start + n]
        start += n
    return out


def vision_rope(rope_pos: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """rope_pos ``(..., 2)`` → cos, sin ``(..., head_dim)``: ``[h-freqs, w-freqs]`` repeated twice."""
    half = head_dim // 2
    inv = inverse_frequencies_f32(half, theta)
    freqs = rope_pos.astype(jnp.float32)[..., None] * jnp.asarray(inv, jnp.float32)  # (..., 2, D/4)
    hw = freqs.reshape(freqs.shape[:-2] + (-1,))
    emb = jnp.concatenate([hw, hw], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


# ----------------------------------------------------------------------------- modules


class Qwen3VLVisionPatchEmbed(nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype, rngs):
        self.proj = Linear(cfg.patch_dim, cfg.hidden_size, axes=("channels", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.proj(x)


class Qwen3VLVisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype, rngs):
        e = cfg.hidden_size
        self.qkv = Linear(e, 3 * e, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.proj = Linear(e, e, axes=("heads", "embed"), dtype=dtype, rngs=rngs)
        self.num_heads, self.head_dim = cfg.num_heads, e // cfg.num_heads

    def __call__(self, x, cos, sin, patch_len):
        """x ``(G, L, E)``; each row attends to its first ``patch_len[g]`` patches. Returns ``(G, L, E)``."""
        g, n, e = x.shape
        qkv = self.qkv(x).reshape(g, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # f32 logits and softmax (XLA); cuDNN flash attention where available for bf16 on GPU
        o = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.maximum(patch_len, 1))
        return self.proj(o.reshape(g, n, e))


class Qwen3VLVisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype, rngs):
        self.linear_fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.linear_fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.act = cfg.hidden_act

    def __call__(self, x):
        return self.linear_fc2(_ACTS[self.act](self.linear_fc1(x)))


class Qwen3VLVisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype, rngs):
        self.norm1 = LayerNorm(cfg.hidden_size, 1e-6, dtype)
        self.norm2 = LayerNorm(cfg.hidden_size, 1e-6, dtype)
        self.attn = Qwen3VLVisionAttention(cfg, dtype, rngs)
        self.mlp = Qwen3VLVisionMLP(cfg, dtype, rngs)

    def __call__(self, x, cos, sin, patch_len):
        x = x + self.attn(self.norm1(x), cos, sin, patch_len)
        return x + self.mlp(self.norm2(x))


class Qwen3VLVisionPatchMerger(nnx.Module):
    """Merge ``m*m`` neighbouring patches: ``(..., L, E) -> (..., L / m^2, out_hidden)``."""

    def __init__(self, cfg: VisionConfig, dtype, rngs, postshuffle_norm: bool):
        e = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.merged = e
        self.postshuffle_norm = postshuffle_norm
        self.norm = LayerNorm(e if postshuffle_norm else cfg.hidden_size, 1e-6, dtype)
        self.linear_fc1 = Linear(e, e, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.linear_fc2 = Linear(e, cfg.out_hidden_size, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        shape = x.shape[:-2] + (-1, self.merged)
        x = self.norm(x.reshape(shape)) if self.postshuffle_norm else self.norm(x).reshape(shape)
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))


class Qwen3VLVisionModel(nnx.Module):
    """``model.visual`` in HF. Call with pixel patches and the arrays of `vision_aux`."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 rules: ShardingRules | None = None):
        self.cfg = cfg
        self.rules = rules
        self.patch_embed = Qwen3VLVisionPatchEmbed(cfg, dtype, rngs)
        self.pos_embed = Embed(cfg.num_position_embeddings, cfg.hidden_size, axes=(None, "embed"),
                               dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([Qwen3VLVisionBlock(cfg, dtype, rngs) for _ in range(cfg.depth)])
        self.merger = Qwen3VLVisionPatchMerger(cfg, dtype, rngs, postshuffle_norm=False)
        self.deepstack_merger_list = nnx.List([
            Qwen3VLVisionPatchMerger(cfg, dtype, rngs, postshuffle_norm=True)
            for _ in cfg.deepstack_visual_indexes])

    def __call__(self, pixel_values: Array, pos_index: Array, pos_weight: Array, rope_pos: Array,
                 patch_len: Array) -> tuple[Array, Array]:
        """Packed patches ``(G, L, C*T*P*P)`` and `vision_aux` arrays → image tokens
        ``(G * L/m^2, out)`` and deepstack features ``(K, G * L/m^2, out)`` (frame-major rows)."""
        cfg = self.cfg
        dtype = self.patch_embed.proj.kernel.dtype
        x = self.patch_embed(pixel_values.astype(dtype))
        table = self.pos_embed.embedding[...]
        pos = jnp.einsum("gnkd,gnk->gnd", jnp.take(table, pos_index, axis=0).astype(jnp.float32),
                         pos_weight.astype(jnp.float32))
        x = x + pos.astype(x.dtype)
        cos, sin = vision_rope(rope_pos, cfg.hidden_size // cfg.num_heads, cfg.rope_theta)
        deep = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, patch_len)
            x = self._constrain(x)
            if i in cfg.deepstack_visual_indexes:
                deep.append(self.deepstack_merger_list[cfg.deepstack_visual_indexes.index(i)](x))
        flat = lambda y: y.reshape(-1, y.shape[-1])  # noqa: E731
        merged = flat(self.merger(x))
        deepstack = jnp.stack([flat(d) for d in deep]) if deep else jnp.zeros((0,) + merged.shape, merged.dtype)
        return merged, deepstack

    def _constrain(self, x):
        """Shard frames over the batch axes when they divide evenly (else leave it to GSPMD)."""
        r = self.rules
        if r is None or r.mesh is None:
            return x
        spec = r.spec(("batch",))[0]
        axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
        size = int(np.prod([r.mesh.shape[a] for a in axes])) if axes else 1
        return shard(x, r, "batch" if x.shape[0] % size == 0 else None, None, "act_embed")
