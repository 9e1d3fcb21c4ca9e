"""Qwen2.5-VL vision tower in Flax NNX, with its windowed attention.

Differences from the Qwen3-VL tower (`arr_jax.models.qwen3_vl_vision`, whose 2-D rotary embedding
and rotate-half RoPE are reused here):

* no learned position table: only the 2-D rotary embedding (row, col of each patch);
* RMSNorm (not LayerNorm) in the blocks and the merger; a gated SiLU MLP (gate/up/down, with bias);
  the patch embedding has no bias; no DeepStack mergers;
* **windowed attention**: in every block except ``fullatt_block_indexes`` a patch attends only to
  the patches of its window, ``window_size / patch_size`` patches square (8x8 for 112 / 14) aligned
  to the merged-token grid; in the full-attention blocks it attends to its whole image.

Layout (host side, `vision_layout`): each image is one row; its merged units (``m x m`` patches,
contiguous in the processor's output) are grouped by window in Hugging Face's window order, and
every window is padded to ``u^2`` units (``u`` = window side in merged units), so a row is
``(n_windows, u^2 m^2)`` patches. Window attention is then a batched attention per window with a
key mask; full attention is over the row with the same mask. The merger maps each unit to one
token; `vision_layout` also says which output row each image token (raster order) takes.
Attention over the real patches is permutation-invariant, so the output equals Hugging Face's.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arr_jax.models.qwen3_vl_text import Linear, RMSNorm, apply_rope
from arr_jax.models.qwen3_vl_vision import vision_rope
from arr_jax.sharding import ShardingRules, shard

Array = jax.Array

_ACTS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
         "gelu": lambda x: jax.nn.gelu(x, approximate=False), "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x)}


@dataclasses.dataclass(frozen=True)
class Qwen25VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    hidden_act: str = "silu"
    rope_theta: float = 10000.0

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "Qwen25VisionConfig":
        """From a ``vision_config`` dict (transformers 4.x ``in_chans`` or 5.x ``in_channels``)."""
        if d.get("hidden_act", "silu") not in _ACTS:
            raise NotImplementedError(f"vision hidden_act {d.get('hidden_act')!r} is not supported")
        kw = {k: d[k] for k in ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size",
                                "temporal_patch_size", "spatial_merge_size", "window_size", "out_hidden_size",
                                "hidden_act") if d.get(k) is not None}
        kw["in_channels"] = d.get("in_channels", d.get("in_chans", 3))
        if d.get("fullatt_block_indexes") is not None:
            kw["fullatt_block_indexes"] = tuple(d["fullatt_block_indexes"])
        rope = d.get("rope_parameters") or {}
        kw["rope_theta"] = float(rope.get("rope_theta", 10000.0))
        cfg = cls(**kw)
        if cfg.window_size % (cfg.patch_size * cfg.spatial_merge_size):
            raise ValueError(f"window_size {cfg.window_size} is not a multiple of patch_size x merge "
                             f"{cfg.patch_size * cfg.spatial_merge_size}")
        return cfg

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def window_units(self) -> int:
        """Window side in merged units (4 for 112 / 14 / 2)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


# ----------------------------------------------------------------------------- host-side layout


def vision_layout(grid_thw: np.ndarray | Sequence[Sequence[int]], cfg: Qwen25VisionConfig,
                  window_bucket: int | None = None, image_bucket: int | None = None) -> dict[str, np.ndarray]:
    """Static per-patch arrays for `Qwen25VLVisionModel` (numpy), one row per image frame.

    Returns ``patch_src (G, L)`` (index into the processor's flat patches, -1 = padding),
    ``rope_pos (G, L, 2)`` (row, col), ``valid (G, L)`` bool and ``token_rows (n_tokens,)``: for
    every merged token, in the processor's (raster) order over all images, its row in the
    model's flat output ``(G * L / m^2, out)``. ``L = n_windows * u^2 * m^2`` with the window count
    rounded up to a multiple of ``window_bucket`` and ``G`` to a multiple of ``image_bucket``.
    """
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    m, u = cfg.spatial_merge_size, cfg.window_units
    per_unit, per_window = m * m, u * u
    frames, start = [], 0
    for t, h, w in grid.tolist():
        if h % m or w % m:
            raise ValueError(f"patch grid {h}x{w} is not divisible by the spatial merge size {m}")
        gh, gw = h // m, w // m
        for _ in range(t):
            units = np.arange(gh * gw).reshape(gh, gw)
            windows = []
            for r0 in range(0, gh, u):
                for c0 in range(0, gw, u):
                    windows.append(units[r0:r0 + u, c0:c0 + u].reshape(-1))
            frames.append((start, gw, windows))
            start += gh * gw * per_unit
    n_win = max((len(f[2]) for f in frames), default=1)
    if window_bucket:
        n_win = -(-n_win // window_bucket) * window_bucket
    length = n_win * per_window * per_unit
    g = len(frames) if not image_bucket else max(-(-len(frames) // image_bucket) * image_bucket, image_bucket)
    out = {"patch_src": np.full((g, length), -1, np.int32), "rope_pos": np.zeros((g, length, 2), np.int32),
           "valid": np.zeros((g, length), bool)}
    token_rows = []
    units_per_row = length // per_unit
    for row, (first, gw, windows) in enumerate(frames):
        unit_slot = {}
        for k, win in enumerate(windows):
            for j, unit in enumerate(win.tolist()):
                slot = k * per_window + j
                unit_slot[unit] = slot
                ur, uc = divmod(unit, gw)
                for p in range(per_unit):
                    pr, pc = divmod(p, m)
                    i = slot * per_unit + p
                    out["patch_src"][row, i] = first + unit * per_unit + p
                    out["rope_pos"][row, i] = (ur * m + pr, uc * m + pc)
                    out["valid"][row, i] = True
        token_rows += [row * units_per_row + unit_slot[unit] for unit in range(len(unit_slot))]
    out["token_rows"] = np.asarray(token_rows, np.int32)
    return out


def pack_vision_patches(pixel_values: np.ndarray, layout: dict[str, np.ndarray]) -> np.ndarray:
    """Processor patches ``(N, patch_dim)`` -> ``(G, L, patch_dim)`` in the layout's order (zeros at padding)."""
    pv = np.asarray(pixel_values, np.float32)
    src = layout["patch_src"]
    if int(layout["valid"].sum()) != pv.shape[0]:
        raise ValueError(f"{pv.shape[0]} pixel patches but image_grid_thw describes {int(layout['valid'].sum())}")
    out = pv[np.maximum(src, 0)]
    out[src < 0] = 0.0
    return out


# ----------------------------------------------------------------------------- modules


def masked_attention(q: Array, k: Array, v: Array, valid: Array) -> Array:
    """q, k, v (B, S, H, D); valid (B, S) keys that may be attended -> (B, S, H, D).

    float32 logits and softmax; a query with no valid key gets a finite (uniform) average.
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(valid[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhst,bthd->bshd", probs, v)


class Qwen25VisionPatchEmbed(nnx.Module):
    """The stride = kernel 3-D conv (no bias) as a linear map of each flat patch."""

    def __init__(self, cfg: Qwen25VisionConfig, dtype, rngs):
        self.proj = Linear(cfg.patch_dim, cfg.hidden_size, axes=("channels", "embed"), bias=False, dtype=dtype,
                           rngs=rngs)

    def __call__(self, x):
        return self.proj(x)


class Qwen25VisionAttention(nnx.Module):
    def __init__(self, cfg: Qwen25VisionConfig, dtype, rngs):
        e = cfg.hidden_size
        self.qkv = Linear(e, 3 * e, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.proj = Linear(e, e, axes=("heads", "embed"), dtype=dtype, rngs=rngs)
        self.num_heads, self.head_dim = cfg.num_heads, e // cfg.num_heads

    def __call__(self, x: Array, cos: Array, sin: Array, valid: Array, window: int | None) -> Array:
        """x (G, L, E); ``window`` patches per window (None: the whole row). Returns (G, L, E)."""
        g, n, e = x.shape
        qkv = self.qkv(x).reshape(g, n, 3, self.num_heads, self.head_dim)
        q, k = apply_rope(qkv[:, :, 0], cos, sin), apply_rope(qkv[:, :, 1], cos, sin)
        v = qkv[:, :, 2]
        if window is None:
            o = masked_attention(q, k, v, valid)
        else:
            split = lambda a: a.reshape((g * (n // window), window) + a.shape[2:])  # noqa: E731
            o = masked_attention(split(q), split(k), split(v), split(valid)).reshape(g, n, self.num_heads,
                                                                                    self.head_dim)
        return self.proj(o.reshape(g, n, e))


class Qwen25VLMLP(nnx.Module):
    """``down(act(gate(x)) * up(x))`` with biases."""

    def __init__(self, cfg: Qwen25VisionConfig, dtype, rngs):
        e, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(e, f, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.up_proj = Linear(e, f, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, e, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.act = cfg.hidden_act

    def __call__(self, x):
        return self.down_proj(_ACTS[self.act](self.gate_proj(x)) * self.up_proj(x))


class Qwen25VisionBlock(nnx.Module):
    def __init__(self, cfg: Qwen25VisionConfig, dtype, rngs):
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6, dtype)
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6, dtype)
        self.attn = Qwen25VisionAttention(cfg, dtype, rngs)
        self.mlp = Qwen25VLMLP(cfg, dtype, rngs)

    def __call__(self, x, cos, sin, valid, window):
        x = x + self.attn(self.norm1(x), cos, sin, valid, window)
        return x + self.mlp(self.norm2(x))


class Qwen25VLPatchMerger(nnx.Module):
    """``ln_q`` (RMSNorm per patch), concatenate each unit's ``m^2`` patches, ``mlp`` = [Linear, GELU, Linear]."""

    def __init__(self, cfg: Qwen25VisionConfig, dtype, rngs):
        e = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.merged = e
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6, dtype)
        self.mlp = nnx.List([Linear(e, e, axes=("embed", "mlp"), dtype=dtype, rngs=rngs), None,
                             Linear(e, cfg.out_hidden_size, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)])

    def __call__(self, x):
        x = self.ln_q(x).reshape(x.shape[:-2] + (-1, self.merged))
        return self.mlp[2](jax.nn.gelu(self.mlp[0](x), approximate=False))


class Qwen25VLVisionModel(nnx.Module):
    """``model.visual`` in HF. Call with packed patches and the `vision_layout` arrays."""

    def __init__(self, cfg: Qwen25VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 rules: ShardingRules | None = None):
        self.cfg, self.rules = cfg, rules
        self.patch_embed = Qwen25VisionPatchEmbed(cfg, dtype, rngs)
        self.blocks = nnx.List([Qwen25VisionBlock(cfg, dtype, rngs) for _ in range(cfg.depth)])
        self.merger = Qwen25VLPatchMerger(cfg, dtype, rngs)

    def __call__(self, pixel_values: Array, rope_pos: Array, valid: Array) -> Array:
        """Packed patches (G, L, patch_dim), rope_pos (G, L, 2), valid (G, L) -> merged tokens
        (G * L / m^2, out_hidden_size), row-major over (image, slot); `vision_layout`'s ``token_rows``
        picks the real ones in raster order."""
        cfg = self.cfg
        x = self.patch_embed(pixel_values.astype(self.patch_embed.proj.kernel.dtype))
        cos, sin = vision_rope(rope_pos, cfg.hidden_size // cfg.num_heads, cfg.rope_theta)
        window = cfg.window_units ** 2 * cfg.spatial_merge_size ** 2
        valid = valid.astype(bool)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, valid, None if i in cfg.fullatt_block_indexes else window)
            x = self._constrain(x)
        merged = self.merger(x)
        return merged.reshape(-1, merged.shape[-1])

    def _constrain(self, x):
        """Shard images over the batch axes when they divide evenly (else leave it to GSPMD)."""
        r = self.rules
        if r is None or r.mesh is None:
            return x
        spec = r.spec(("batch",))[0]
        axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
        size = int(np.prod([r.mesh.shape[a] for a in axes])) if axes else 1
        return shard(x, r, "batch" if x.shape[0] % size == 0 else None, None, "act_embed")
