"""Qwen-Image text-to-image and Qwen-Image-Edit / Edit-2509 editing on our models, as diffusers computes them.

    prompt (+ sources at the condition size) --Qwen2.5-VL, cached--> txt (B, L, 3584), txt_mask (B, L)
    sources --resize to ~vae_area, VAE encode (mean), (z - mean) / std, pack 2x2--> source (B, M, 64)
    seeds --N(0, 1) packed latents (B, N, 64), N = (H/16)(W/16)-->                   x_1
    x_1 --ODE (FlowMatchEulerDiscreteScheduler: dynamic shift mu(N), stretched to shift_terminal),
          true CFG: v = neg + s (pos - neg), rescaled per token to |pos|-->          x_0
       or SDE with log-probs (`arr_jax.diffusion.rollout.sde_rollout`, RPO, no CFG) --> Trajectory
    x_0 --unpack, z / (1 / std) + mean, VAE decode-->                               images (B, H, W, 3) in [-1, 1]

The transformer sees ``[target tokens; source tokens of image 1; image 2; ...]`` and the velocity of
the target tokens is kept (`QwenImageLatentSpace.apply`). Sizes follow diffusers: an Edit source is
resized (Lanczos) to ``vae_area`` keeping its aspect ratio (sides multiples of 32), Edit-Plus also
makes a ``condition_area`` copy for the text encoder, and the output defaults to ``vae_area`` at the
aspect ratio of the (last) source; text-to-image defaults to 1024^2. ``vae_area=None`` keeps each
source's own size, which must then be divisible by 16 (VAE factor 8 x 2x2 packing).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arr_jax.diffusion.flux_pipeline import (SampleOutput, check_image_size, flux_mu, from_uint8, pack_latents,
                                             unpack_latents)
from arr_jax.diffusion.qwen_image_text import MAX_SOURCES, QwenImagePromptEncoder, as_prompt_list, pad_states
from arr_jax.diffusion.rollout import Trajectory, sde_rollout
from arr_jax.diffusion.schedule import rollout_sigmas
from arr_jax.diffusion.sde import ode_step
from arr_jax.models.qwen_image import qwen_rope_ids
from arr_jax.sharding import ShardingRules

NAMES = {"t2i": "Qwen-Image", "edit": "Qwen-Image-Edit", "edit_plus": "Qwen-Image-Edit-2509"}


# ---------------------------------------------------------------------------- geometry and schedule

def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about ``area`` pixels at aspect ``ratio = w / h``, each a multiple of 32 (diffusers)."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    return int(round(width / 32) * 32), int(round(height / 32) * 32)


def qwen_sigmas(num_steps: int, image_seq_len: int, scheduler) -> tuple[np.ndarray, np.ndarray]:
    """Sigmas (T+1,) and model timesteps (T,) of the Qwen-Image pipelines.

    ``linspace(1, 1/T, T)`` time-shifted by ``exp(mu(N))`` (dynamic) or ``shift``, then stretched so the
    last sigma is ``shift_terminal`` (``1 - (1 - s) / ((1 - s[-1]) / (1 - shift_terminal))``), a final 0
    appended; the model sees ``(sigma * 1000) / 1000`` in float32 -- all as diffusers rounds it.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps == 1 and scheduler.shift_terminal:
        raise ValueError("num_steps=1 cannot be stretched to shift_terminal (diffusers divides 0 by 0 there); "
                         "use at least 2 steps")
    s = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    if scheduler.use_dynamic_shifting:
        e = math.exp(flux_mu(image_seq_len, scheduler))
        s = e / (e + (1 / s - 1) ** 1.0)
    else:
        s = scheduler.shift * s / (1 + (scheduler.shift - 1) * s)
    s = s.astype(np.float32)
    if scheduler.shift_terminal:
        one_minus = np.float32(1.0) - s
        scale = one_minus[-1] / np.float32(1.0 - scheduler.shift_terminal)
        s = (np.float32(1.0) - one_minus / scale).astype(np.float32)
    n = np.float32(scheduler.num_train_timesteps)
    timesteps = (s * n).astype(np.float32) / n
    return np.append(s, np.float32(0.0)).astype(np.float32), timesteps.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class QwenImageLatentSpace:
    """Static geometry of one target size and its sources, and the RPO policy interface
    ``apply(model, x, t, cond)``. ``cond``: ``txt`` (B, L, D), ``txt_mask`` (B, L) bool and, for
    editing, ``source`` (B, M, C) (the packed source latents, image after image)."""

    height: int
    width: int
    vae_factor: int = 8
    z_dim: int = 16
    source_hws: tuple[tuple[int, int], ...] = ()  # VAE-size (H, W) of each source image

    def __post_init__(self):
        check_image_size(self.height, self.width, 2 * self.vae_factor)
        for i, hw in enumerate(self.source_hws):
            check_image_size(*hw, 2 * self.vae_factor, what=f"source image {i + 1}")

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // self.vae_factor, self.width // self.vae_factor

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return (h // 2) * (w // 2)

    @property
    def latent_shape(self) -> tuple[int, int]:
        """Packed latent shape (N, C) of one sample."""
        return self.num_tokens, 4 * self.z_dim

    def img_shapes(self) -> list[tuple[int, int, int]]:
        """diffusers' ``img_shapes`` of one sample: (1, h/2, w/2) of the target, then of each source."""
        f = 2 * self.vae_factor
        return [(1, self.height // f, self.width // f)] + [(1, h // f, w // f) for h, w in self.source_hws]

    def apply(self, model, x: jax.Array, t: jax.Array, cond: dict) -> jax.Array:
        """Velocity (B, N, C) of packed latents ``x`` (B, N, C) at sigma ``t`` (B,)."""
        n = x.shape[1]
        if self.source_hws:
            x = jnp.concatenate([x.astype(jnp.float32), cond["source"].astype(jnp.float32)], axis=1)
        img_ids, txt_ids = qwen_rope_ids(self.img_shapes(), cond["txt"].shape[1])
        v = model(x, cond["txt"], t, jnp.asarray(img_ids), jnp.asarray(txt_ids), txt_mask=cond.get("txt_mask"),
                  n_target=n)
        return v[:, :n]


def as_source_lists(sources, batch: int) -> list[list[np.ndarray]]:
    """Normalise ``sources`` to one list of uint8 (H, W, 3) images per prompt.

    Accepted: None; one image (H, W, 3) array, PIL image, path or bytes for every prompt; a batch (B, H, W, 3)
    (one per prompt); or a list of B entries, each an image (array or PIL) or a list of images.
    """
    from arr_jax.data.images import to_rgb_uint8

    if sources is None:
        return [[] for _ in range(batch)]
    if not isinstance(sources, (np.ndarray, list, tuple)):  # one PIL image / path / bytes, as diffusers takes
        sources = to_rgb_uint8(sources, name="source image")
    if isinstance(sources, np.ndarray):
        if sources.ndim == 3:
            return [[sources] for _ in range(batch)]
        if sources.ndim == 4:
            sources = list(sources)
        else:
            raise ValueError(f"source images must be (H, W, 3) or (B, H, W, 3) uint8, got shape {sources.shape}")
    def one(x, where):
        return x if isinstance(x, np.ndarray) else to_rgb_uint8(x, name=where)

    out = [[s] if isinstance(s, np.ndarray) and s.ndim == 3
           else [one(s, f"source image {i}")] if not isinstance(s, (list, tuple, np.ndarray))
           else [one(x, f"source image {i}[{j}]") for j, x in enumerate(s)] for i, s in enumerate(sources)]
    if len(out) == 1 and batch > 1:
        out = out * batch
    if len(out) != batch:
        raise ValueError(f"{len(out)} source entries for {batch} prompts")
    for i, ims in enumerate(out):
        for im in ims:
            if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
                raise ValueError(f"prompt {i}: source images must be uint8 (H, W, 3), got {im.dtype} {im.shape}")
    return out


def resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (height, width, 3) with Pillow's Lanczos (diffusers' VaeImageProcessor.resize)."""
    from PIL import Image

    if img.shape[:2] == (height, width):
        return img
    return np.asarray(Image.fromarray(img).resize((width, height), resample=Image.LANCZOS))


# ---------------------------------------------------------------------------- the pipeline

class QwenImagePipeline:
    """Qwen-Image sampling on a loaded `arr_jax.convert.qwen_image_snapshot.QwenImageSnapshot`.

    Args:
      cache_dir: prompt-embedding cache folder (None: memory only).
      vae_area / condition_area: resize areas of the sources for the VAE and (Edit-Plus) the text
        encoder (diffusers: 1024^2 and 384^2); ``vae_area=None`` keeps the sources' own sizes.
      max_sources: source images a prompt may have (default: Edit 1, Edit-Plus 3).
      text_bucket: text lengths are padded to a multiple of this (fewer compiled shapes).
    The transformer is re-split on every call, so LoRA adapters changed in place are used.
    """

    def __init__(self, snapshot, *, cache_dir: str | Path | None = None, rules: ShardingRules | None = None,
                 vae_area: int | None = 1024 * 1024, condition_area: int = 384 * 384, max_sources: int | None = None,
                 text_bucket: int = 64):
        self.snap, self.kind, self.rules = snapshot, snapshot.kind, rules
        self.vae_area, self.condition_area, self.text_bucket = vae_area, condition_area, text_bucket
        self.max_sources = MAX_SOURCES[self.kind] if max_sources is None else max_sources
        self.prompts = QwenImagePromptEncoder(snapshot, cache_dir=cache_dir)
        self._vae = nnx.split(snapshot.vae)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, cache_dir=None, rules=None, vae_area=1024 * 1024,
                        condition_area=384 * 384, max_sources=None, **load_kw) -> "QwenImagePipeline":
        """Load a snapshot directory (see `load_qwen_image_snapshot` for ``load_kw``: dtype, lora, expect ...)."""
        from arr_jax.convert.qwen_image_snapshot import load_qwen_image_snapshot

        return cls(load_qwen_image_snapshot(path, rules=rules, **load_kw), cache_dir=cache_dir, rules=rules,
                   vae_area=vae_area, condition_area=condition_area, max_sources=max_sources)

    @property
    def transformer(self):
        return self.snap.transformer

    @property
    def stats(self) -> dict:
        return self.prompts.stats

    @property
    def vae_factor(self) -> int:
        return self.snap.vae.downsample_factor

    def latent_space(self, height: int, width: int, source_hws=()) -> QwenImageLatentSpace:
        return QwenImageLatentSpace(height, width, self.vae_factor, self.snap.vae.config.z_dim,
                                    tuple(tuple(int(v) for v in hw) for hw in source_hws))

    # --- sources -----------------------------------------------------------------------------
    def source_sizes(self, hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """(VAE size, condition size) as (H, W) for a source of size ``hw`` (see the module doc)."""
        h, w = hw
        if self.vae_area is None:
            check_image_size(h, w, 2 * self.vae_factor, what="source image")
            vae = (h, w)
        else:
            vw, vh = calculate_dimensions(self.vae_area, w / h)
            vae = (vh, vw)
        if self.kind == "edit":
            return vae, vae
        cw, ch = calculate_dimensions(self.condition_area, w / h)
        return vae, (ch, cw)

    def prepare_sources(self, sources: list[list[np.ndarray]]):
        """Per prompt its images resized for the VAE and for the text encoder; checks counts and sizes."""
        counts = {len(s) for s in sources}
        for i, ims in enumerate(sources):
            if self.kind == "t2i" and ims:
                raise ValueError(f"source images given for prompt {i}, but this snapshot is text-to-image "
                                 f"(Qwen-Image); use a Qwen-Image-Edit snapshot")
            if self.kind != "t2i" and not ims:
                raise ValueError(f"prompt {i} has no source image; {NAMES[self.kind]} edits a source image")
            if len(ims) > self.max_sources:
                raise ValueError(f"prompt {i} has {len(ims)} source images, but {NAMES[self.kind]} takes at most "
                                 f"{self.max_sources}")
        if len(counts) > 1:
            raise ValueError(f"prompts of one batch need the same number of source images, got {sorted(counts)}")
        vae_imgs, cond_imgs = [], []
        for ims in sources:
            sizes = [self.source_sizes(im.shape[:2]) for im in ims]
            vae_imgs.append([resize(im, *v) for im, (v, _) in zip(ims, sizes)])
            cond_imgs.append([resize(im, *c) for im, (_, c) in zip(ims, sizes)])
        hws = [tuple(im.shape[:2] for im in ims) for ims in vae_imgs]
        if len(set(hws)) > 1:
            raise ValueError(f"source images of one batch must come out the same size, got {sorted(set(hws))}; "
                             f"sample them in separate batches")
        return vae_imgs, cond_imgs, (hws[0] if hws else ())

    def encode_sources(self, vae_imgs: list[list[np.ndarray]]) -> np.ndarray:
        """Per prompt its VAE-size uint8 images -> packed, normalised latents (B, M, C) float32, image after image."""
        out = []
        for k in range(len(vae_imgs[0])):
            batch = np.stack([ims[k] for ims in vae_imgs])
            out.append(np.asarray(_encode_image_jit(self._vae[0], self._vae[1], jnp.asarray(from_uint8(batch)))))
        return np.concatenate(out, axis=1)

    def conditioning(self, prompts: Sequence[str], sources=None, negative_prompt: str | Sequence[str] | None = None):
        """(cond, neg_cond or None, source VAE sizes) for `QwenImageLatentSpace.apply`; ``self.last_source_hw``
        keeps the original size of the first prompt's last source (the default output aspect)."""
        prompts = as_prompt_list(prompts)
        srcs = as_source_lists(sources, len(prompts))
        vae_imgs, cond_imgs, hws = self.prepare_sources(srcs)
        self.last_source_hw = srcs[0][-1].shape[:2] if srcs[0] else None
        cond = self._text(prompts, cond_imgs)
        neg = None
        if negative_prompt is not None:
            negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            neg = self._text(negs, cond_imgs)
        if hws:
            src = jnp.asarray(self.encode_sources(vae_imgs))
            cond["source"] = src
            if neg is not None:
                neg["source"] = src
        return cond, neg, hws

    def _text(self, prompts, cond_imgs) -> dict:
        states = self.prompts(prompts, cond_imgs if self.kind != "t2i" else None)
        txt, mask = pad_states(states, bucket=self.text_bucket)
        return {"txt": jnp.asarray(txt), "txt_mask": jnp.asarray(mask)}

    def noise(self, seeds: Sequence[int], space: QwenImageLatentSpace) -> jax.Array:
        """Initial packed latents (B, N, C): N(0, 1) from ``jax.random.key(seed)`` per sample."""
        return jnp.stack([jax.random.normal(jax.random.key(int(s)), space.latent_shape, jnp.float32) for s in seeds])

    def _prepare(self, prompts, sources, negative_prompt, height, width, seeds, latents):
        prompts = as_prompt_list(prompts)
        cond, neg, hws = self.conditioning(prompts, sources, negative_prompt)
        if hws:
            sh, sw = self.last_source_hw
            default = hws[-1] if self.vae_area is None else calculate_dimensions(self.vae_area, sw / sh)[::-1]
        else:
            default = (128 * self.vae_factor,) * 2  # diffusers: 1024
        space = self.latent_space(height or default[0], width or default[1], hws)
        if latents is None:
            seeds = list(range(len(prompts))) if seeds is None else list(seeds)
            if len(seeds) != len(prompts):
                raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
            latents = self.noise(seeds, space)
        latents = jnp.asarray(latents, jnp.float32)
        if latents.shape != (len(prompts),) + space.latent_shape:
            raise ValueError(f"latents {latents.shape} != (B, N, C) = {(len(prompts),) + space.latent_shape}")
        return space, cond, neg, latents

    # --- sampling -----------------------------------------------------------------------------
    def sample(self, prompts: Sequence[str], sources=None, *, negative_prompt: str | Sequence[str] | None = None,
               true_cfg_scale: float = 4.0, height: int | None = None, width: int | None = None,
               num_steps: int = 50, seeds: Sequence[int] | None = None, latents=None) -> SampleOutput:
        """Deterministic sampling (evaluation), the diffusers pipelines' Euler steps and sigmas.

        True CFG runs when ``negative_prompt`` is given and ``true_cfg_scale > 1`` (as in diffusers;
        Qwen's recommended negative prompt is ``" "``). ``sources``: see `as_source_lists`.
        """
        space, cond, neg, x = self._prepare(prompts, sources, negative_prompt, height, width, seeds, latents)
        if true_cfg_scale <= 1.0:
            neg = None
        sigmas, timesteps = qwen_sigmas(num_steps, space.num_tokens, self.snap.scheduler)
        graphdef, state = nnx.split(self.transformer)
        x0 = _ode_jit(graphdef, state, space, x, cond, neg, jnp.asarray(sigmas), jnp.asarray(timesteps),
                      jnp.float32(true_cfg_scale))
        return SampleOutput(np.asarray(self.decode(x0, space)), np.asarray(x0))

    def rollout(self, prompts: Sequence[str], key: jax.Array, sources=None, *, height: int | None = None,
                width: int | None = None, num_steps: int = 10, eta: float = 0.3, sigmas=None, time_shift: float = 3.0,
                seeds=None, latents=None, sde_kind: str = "dance", quantize_t: bool = True
                ) -> tuple[Trajectory, np.ndarray]:
        """The RPO rollout (SPEC §2), no CFG: SDE steps with log-probs; returns (trajectory, images [-1, 1])."""
        space, cond, _, x = self._prepare(prompts, sources, None, height, width, seeds, latents)
        sig = rollout_sigmas(num_steps, time_shift) if sigmas is None else np.asarray(sigmas, np.float32)
        graphdef, state = nnx.split(self.transformer)
        traj = _sde_jit(graphdef, state, x, cond, jnp.asarray(sig), key, space=space, eta=float(eta), kind=sde_kind,
                        quantize_t=quantize_t)
        return traj, np.asarray(self.decode(traj.x0, space))

    def decode(self, x0: jax.Array, space: QwenImageLatentSpace) -> jax.Array:
        """Packed latents (B, N, C) -> images (B, H, W, 3) float32 in [-1, 1]."""
        return _decode_jit(self._vae[0], self._vae[1], space, jnp.asarray(x0))


# ---------------------------------------------------------------------------- jitted programs

def cfg_combine(pos: jax.Array, neg: jax.Array, scale: jax.Array) -> jax.Array:
    """Qwen-Image's true CFG: ``neg + scale (pos - neg)`` rescaled per token to the norm of ``pos`` (float32)."""
    pos, neg = pos.astype(jnp.float32), neg.astype(jnp.float32)
    comb = neg + scale * (pos - neg)
    return comb * (jnp.linalg.norm(pos, axis=-1, keepdims=True) / jnp.linalg.norm(comb, axis=-1, keepdims=True))


def _ode(graphdef, state, space: QwenImageLatentSpace, x, cond, neg, sigmas, timesteps, cfg_scale):
    """Euler steps ``x += (sigma_next - sigma) v`` (with true CFG when ``neg`` is given); x (B, N, C) float32."""
    model = nnx.merge(graphdef, state)
    batch = x.shape[0]

    def body(x, i):
        t = jnp.full((batch,), timesteps[i])
        v = space.apply(model, x, t, cond)
        if neg is not None:
            v = cfg_combine(v, space.apply(model, x, t, neg), cfg_scale)
        return ode_step(v, x, sigmas[i], sigmas[i + 1]), None

    x, _ = jax.lax.scan(body, x.astype(jnp.float32), jnp.arange(timesteps.shape[0]))
    return x


def _sde(graphdef, state, x, cond, sigmas, key, *, space: QwenImageLatentSpace, eta: float, kind: str,
         quantize_t: bool) -> Trajectory:
    model = nnx.merge(graphdef, state)
    return sde_rollout(lambda x, t: space.apply(model, x, t, cond), x, sigmas, eta, key, kind=kind,
                       quantize_t=quantize_t)


def decode_latents(vae, space: QwenImageLatentSpace, x0: jax.Array) -> jax.Array:
    """Packed latents (B, N, C) -> images (B, H, W, 3) float32 in [-1, 1] with a `QwenImageVAE`."""
    h, w = space.grid
    return vae.decode(vae.unscale_latents(unpack_latents(x0.astype(jnp.float32), h, w)))


def _decode(vae_graph, vae_state, space, x0):
    return decode_latents(nnx.merge(vae_graph, vae_state), space, x0)


def _encode_image(vae_graph, vae_state, images):
    """images (B, H, W, 3) in [-1, 1] -> packed, normalised posterior means (B, M, C)."""
    vae = nnx.merge(vae_graph, vae_state)
    return pack_latents(vae.scale_latents(vae.encode(images)))


_ode_jit = jax.jit(_ode, static_argnums=(0, 2))
_sde_jit = jax.jit(_sde, static_argnames=("graphdef", "space", "eta", "kind", "quantize_t"))
_decode_jit = jax.jit(_decode, static_argnums=(0, 2))
_encode_image_jit = jax.jit(_encode_image, static_argnums=(0,))
