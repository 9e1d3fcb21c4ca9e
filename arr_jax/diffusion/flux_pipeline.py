"""FLUX.1-dev text-to-image and FLUX.1-Kontext editing on our models, as diffusers computes them.

    prompts --CLIP (pooled, B x 768) + T5 (B x 512 x 4096), cached on disk-->  cond
    seeds   --N(0, 1) packed latents (B, N, 64), N = (H/16)*(W/16)-->           x_1
    x_1 --ODE (FlowMatchEulerDiscreteScheduler steps, resolution-dependent shift mu)-->  x_0
        or SDE with log-probs (`arr_jax.diffusion.rollout.sde_rollout`, RPO)     -->  Trajectory
    x_0 --unpack (B, H/8, W/8, 16) -> z/scale + shift -> VAE decode-->          images (B, H, W, 3) in [-1, 1]

Kontext: the source image is VAE-encoded (posterior mean), scaled, packed to (B, M, 64) and
appended after the image tokens, with position ids (1, row, col); the velocity of the first N
tokens is kept. Packing follows diffusers: token (i, j) holds channels ``c*4 + dy*2 + dx`` of
latent pixel (2i+dy, 2j+dx).

Shapes: B batch, h x w latent grid (H/8 x W/8), N = h*w/4 image tokens, C = 4 * latent channels.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arr_jax.data.images import to_rgb_uint8_batch
from arr_jax.diffusion.rollout import Trajectory, sde_rollout
from arr_jax.diffusion.schedule import rollout_sigmas
from arr_jax.diffusion.sde import ode_step
from arr_jax.multihost import host_tree
from arr_jax.sharding import ShardingRules


class PromptTruncationWarning(UserWarning):
    """A prompt was longer than a text encoder's token limit and was cut."""


# ---------------------------------------------------------------------------- geometry

def pack_latents(z: jax.Array) -> jax.Array:
    """(B, h, w, c) VAE latents -> (B, h/2 * w/2, 4c) tokens, channel order ``c*4 + dy*2 + dx``."""
    b, h, w, c = z.shape
    z = z.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: jax.Array, h: int, w: int) -> jax.Array:
    """Inverse of `pack_latents`: (B, h/2 * w/2, 4c) -> (B, h, w, c)."""
    b, _, c4 = x.shape
    z = x.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return z.reshape(b, h, w, c4 // 4)


def latent_ids(h2: int, w2: int, index: float = 0.0) -> np.ndarray:
    """Position ids (h2*w2, 3) float32: (index, row, col); index 1 marks Kontext's source tokens."""
    ids = np.zeros((h2, w2, 3), np.float32)
    ids[..., 0] = index
    ids[..., 1] = np.arange(h2)[:, None]
    ids[..., 2] = np.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3)


def check_image_size(height: int, width: int, multiple: int, what: str = "image") -> None:
    """FLUX needs sides divisible by ``multiple`` = 2 x VAE factor (16): a clear error otherwise."""
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        h, w = max(height // multiple, 1) * multiple, max(width // multiple, 1) * multiple
        raise ValueError(f"{what} size {height}x{width} (HxW) is not divisible by {multiple} (VAE factor "
                         f"{multiple // 2} x 2x2 latent packing); resize or crop it, e.g. to {h}x{w}")


def flux_mu(image_seq_len: int, scheduler) -> float:
    """FluxPipeline's ``calculate_shift``: mu linear in the image token count."""
    s = scheduler
    m = (s.max_shift - s.base_shift) / (s.max_image_seq_len - s.base_image_seq_len)
    return image_seq_len * m + (s.base_shift - m * s.base_image_seq_len)


def flux_sigmas(num_steps: int, image_seq_len: int, scheduler) -> tuple[np.ndarray, np.ndarray]:
    """The sigmas (T+1,) and model timesteps (T,) FluxPipeline + FlowMatchEulerDiscreteScheduler use.

    ``linspace(1, 1/T, T)`` time-shifted by ``exp(mu)`` (dynamic) or ``shift``, a final 0 appended;
    the model sees ``(sigma * 1000) / 1000`` in float32 -- all as diffusers rounds it.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    s = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    if scheduler.use_dynamic_shifting:
        e = math.exp(flux_mu(image_seq_len, scheduler))
        s = e / (e + (1 / s - 1) ** 1.0)
    else:
        s = scheduler.shift * s / (1 + (scheduler.shift - 1) * s)
    s = s.astype(np.float32)
    n = np.float32(scheduler.num_train_timesteps)
    timesteps = (s * n).astype(np.float32) / n
    return np.append(s, np.float32(0.0)).astype(np.float32), timesteps.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class FluxLatentSpace:
    """Static geometry of one image size, and the RPO policy interface ``apply(model, x, t, cond)``.

    ``cond``: ``txt`` (B, L, joint_dim), ``pooled`` (B, P), ``guidance`` (B,) when the model is
    guidance-distilled, ``source`` (B, M, C) for Kontext.
    """

    height: int
    width: int
    vae_factor: int = 8
    latent_channels: int = 16
    source_hw: tuple[int, int] | None = None  # Kontext source image (H, W)

    def __post_init__(self):
        check_image_size(self.height, self.width, 2 * self.vae_factor)
        if self.source_hw is not None:
            check_image_size(*self.source_hw, 2 * self.vae_factor, what="Kontext source image")

    @property
    def grid(self) -> tuple[int, int]:
        """Latent grid (h, w) = (H, W) / vae_factor."""
        return self.height // self.vae_factor, self.width // self.vae_factor

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return (h // 2) * (w // 2)

    @property
    def latent_shape(self) -> tuple[int, int]:
        """Packed latent shape (N, C) of one sample."""
        return self.num_tokens, 4 * self.latent_channels

    def img_ids(self) -> np.ndarray:
        """(N [+ M], 3): target tokens, then (Kontext) source tokens with first id 1."""
        h, w = self.grid
        ids = latent_ids(h // 2, w // 2)
        if self.source_hw is not None:
            sh, sw = (s // self.vae_factor for s in self.source_hw)
            ids = np.concatenate([ids, latent_ids(sh // 2, sw // 2, index=1.0)], axis=0)
        return ids

    def apply(self, flux, x: jax.Array, t: jax.Array, cond: dict) -> jax.Array:
        """Velocity (B, N, C) of packed latents ``x`` (B, N, C) at sigma ``t`` (B,)."""
        n = x.shape[1]
        if self.source_hw is not None:
            x = jnp.concatenate([x.astype(jnp.float32), cond["source"].astype(jnp.float32)], axis=1)
        txt_ids = jnp.zeros((cond["txt"].shape[1], 3), jnp.float32)
        v = flux(x, cond["txt"], cond["pooled"], t, jnp.asarray(self.img_ids()), txt_ids,
                 guidance=cond.get("guidance"))
        return v[:, :n]


# ---------------------------------------------------------------------------- prompt cache

class PromptCache:
    """Prompt embeddings on disk (one ``.npz`` per prompt) and in memory.

    Keyed by ``sha256(fingerprint, prompt)``; the fingerprint covers both tokenizers, both text
    encoders' files and the dtype, so a changed model or tokenizer never reads stale entries.
    An entry is any dict of arrays (FLUX: ``txt``, ``pooled``); the ``prompt`` key may be any
    string that identifies the input (Qwen-Image: the text plus hashes of its source images).
    """

    def __init__(self, directory: str | Path | None, fingerprint: str, memory_entries: int = 512):
        self.dir = Path(directory) / fingerprint[:16] if directory else None
        self.fingerprint = fingerprint
        # An LRU in memory (one FLUX.1-dev entry is 512 x 4096 bf16 = 4 MB); unbounded without a disk cache.
        self.memory_entries = memory_entries if self.dir is not None else None
        self._mem: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _remember(self, prompt: str, entry: dict[str, np.ndarray]) -> None:
        self._mem[prompt] = entry
        self._mem.move_to_end(prompt)
        while self.memory_entries is not None and len(self._mem) > self.memory_entries:
            self._mem.popitem(last=False)

    def _file(self, prompt: str) -> Path:
        key = hashlib.sha256((self.fingerprint + "\0" + prompt).encode()).hexdigest()[:40]
        return self.dir / f"{key}.npz"

    def get(self, prompt: str) -> dict[str, np.ndarray] | None:
        if prompt in self._mem:
            self._mem.move_to_end(prompt)
            return self._mem[prompt]
        if self.dir is None or not self._file(prompt).exists():
            return None
        try:
            with np.load(self._file(prompt)) as f:
                if str(f["prompt"]) != prompt:  # hash collision: treat as missing
                    return None
                entry = {k: _restore(f[k], str(f[f"{k}__dtype"])) for k in f.files
                         if k != "prompt" and not k.endswith("__dtype")}
        except Exception as e:  # noqa: BLE001 - a truncated / damaged entry (zip, pickle, key errors) is re-encoded
            import logging

            logging.getLogger(__name__).warning("prompt cache: ignoring damaged entry %s (%s: %s)", self._file(prompt),
                                                type(e).__name__, e)
            return None
        self._remember(prompt, entry)
        return entry

    def put(self, prompt: str, entry: dict[str, np.ndarray]) -> None:
        self._remember(prompt, entry)
        if self.dir is None:
            return
        arrays = {"prompt": np.array(prompt)}
        for k, v in entry.items():
            arrays[k], arrays[f"{k}__dtype"] = _storable(v)
        import os
        import tempfile

        fd, tmp = tempfile.mkstemp(prefix=".entry.", suffix=".tmp.npz", dir=self.dir)  # unique: processes share dirs
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._file(prompt))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _storable(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """npz cannot hold bfloat16: store its bits as uint16, with the dtype name beside."""
    name = str(a.dtype)
    return (a.view(np.uint16) if name == "bfloat16" else a), np.array(name)


def _restore(a: np.ndarray, name: str) -> np.ndarray:
    if name == "bfloat16":
        import ml_dtypes

        return a.view(ml_dtypes.bfloat16)
    return a.astype(name)


# ---------------------------------------------------------------------------- the pipeline

class SampleOutput(NamedTuple):
    images: np.ndarray   # (B, H, W, 3) float32 in ~[-1, 1]
    latents: np.ndarray  # (B, N, C) final packed latents (ODE) or last x0_hat (SDE)


def to_uint8(images) -> np.ndarray:
    """[-1, 1] float -> uint8 (diffusers' postprocess: clamp((x + 1) / 2) * 255, rounded)."""
    return np.asarray(jnp.clip(jnp.round((jnp.asarray(images) + 1.0) * 127.5), 0, 255).astype(jnp.uint8))


def from_uint8(images) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 [-1, 1] as diffusers' VaeImageProcessor: ``2 * (x / 255) - 1``."""
    return 2.0 * (np.asarray(images, np.uint8).astype(np.float32) / np.float32(255.0)) - 1.0


class FluxPipeline:
    """FLUX.1 / FLUX.1-Kontext sampling on a loaded `arr_jax.convert.snapshot.FluxSnapshot`.

    Every heavy step is one jitted pure function of ``(graphdef, state, ...)``; the transformer
    is re-split on each call, so LoRA adapters changed in place (training, `load_peft_lora`) are used.
    """

    def __init__(self, snapshot, *, cache_dir: str | Path | None = None, encode_batch: int = 8,
                 rules: ShardingRules | None = None):
        self.snap = snapshot
        self.kind = snapshot.kind
        self.rules = rules
        self.encode_batch = encode_batch
        text_dtype = snapshot.t5.shared.embedding.get_value().dtype
        self.cache = PromptCache(cache_dir, snapshot.text_fingerprint(text_dtype))
        self.stats = {"t5_truncated": 0, "clip_truncated": 0, "encoded": 0, "cache_hits": 0}
        self._clip = nnx.split(snapshot.clip)
        self._t5 = nnx.split(snapshot.t5)
        self._vae = nnx.split(snapshot.vae)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, cache_dir=None, rules=None, **load_kw) -> "FluxPipeline":
        """Load a snapshot directory (see `arr_jax.convert.snapshot.load_flux_snapshot` for ``load_kw``)."""
        from arr_jax.convert.snapshot import load_flux_snapshot

        return cls(load_flux_snapshot(path, rules=rules, **load_kw), cache_dir=cache_dir, rules=rules)

    @property
    def transformer(self):
        return self.snap.transformer

    @property
    def vae_factor(self) -> int:
        return self.snap.vae.downsample_factor

    def latent_space(self, height: int, width: int, source_hw: tuple[int, int] | None = None) -> FluxLatentSpace:
        if self.kind == "kontext" and source_hw is None:
            raise ValueError("a Kontext pipeline needs source images (source_hw)")
        return FluxLatentSpace(height, width, self.vae_factor, self.snap.vae.config.latent_channels,
                               None if source_hw is None else tuple(source_hw))

    # --- text -----------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """``txt`` (B, L_t5, joint_dim) and ``pooled`` (B, P), via the cache; new prompts in fixed batches."""
        from arr_jax.diffusion.qwen_image_text import as_prompt_list

        prompts = as_prompt_list(prompts)
        found = {p: self.cache.get(p) for p in dict.fromkeys(prompts)}
        missing = [p for p, e in found.items() if e is None]
        self.stats["cache_hits"] += len(prompts) - len(missing)  # duplicates are encoded once
        if missing and self._t5 is None:
            raise RuntimeError(f"{len(missing)} prompt(s) are not in the embedding cache and the text encoders "
                               f"were released (first: {missing[0][:80]!r})")
        for lo in range(0, len(missing), self.encode_batch):
            chunk = missing[lo:lo + self.encode_batch]
            padded = chunk + [""] * (self.encode_batch - len(chunk))  # one compiled shape
            clip_ids, clip_len = self.snap.clip_tokenizer(padded)
            t5_ids, t5_len = self.snap.t5_tokenizer(padded)
            self._count_truncation(chunk, t5_len, self.snap.t5_tokenizer.max_length, "t5", "T5")
            self._count_truncation(chunk, clip_len, self.snap.clip_tokenizer.max_length, "clip", "CLIP")
            txt, pooled = host_tree(_encode_text_jit(  # gathered across processes when sharded over several
                self._clip[0], self._clip[1], self._t5[0], self._t5[1], jnp.asarray(clip_ids), jnp.asarray(t5_ids)))
            for i, p in enumerate(chunk):
                found[p] = {"txt": np.array(txt[i]), "pooled": np.array(pooled[i])}
                self.cache.put(p, found[p])
            self.stats["encoded"] += len(chunk)
        entries = [found[p] for p in prompts]
        return {"txt": np.stack([e["txt"] for e in entries]), "pooled": np.stack([e["pooled"] for e in entries])}

    def release_text_encoders(self) -> None:
        """Drop T5 and CLIP (e.g. after encoding every prompt of a run): ~9.5 GB of T5-XXL bf16 freed.

        Later prompts must then come from the cache, or `encode_prompts` raises.
        """
        self._t5 = self._clip = None
        self.snap.t5 = self.snap.clip = None

    def _count_truncation(self, prompts, lengths, limit, key, name):
        cut = [p for p, n in zip(prompts, lengths) if n > limit]
        if cut:
            self.stats[f"{key}_truncated"] += len(cut)
            warnings.warn(f"{len(cut)} prompt(s) exceed the {name} limit of {limit} tokens and were truncated "
                          f"(first: {cut[0][:80]!r}...); {self.stats[f'{key}_truncated']} truncated so far",
                          PromptTruncationWarning, stacklevel=3)

    # --- conditioning and noise ---------------------------------------------------------------
    def encode_sources(self, images) -> np.ndarray:
        """Kontext source images -> scaled, packed latents (B, M, C) float32.

        ``images``: uint8 (B, H, W, 3), or anything `arr_jax.data.images.to_rgb_uint8_batch` takes
        ((B, H, W, 1|4), one (H, W[, C]) image, a list of files / PIL images / arrays; RGBA on
        white, 16-bit / float scaled). Another layout, e.g. (2, 32, 32), is an `ImageDecodeError`
        (a ValueError) naming the expected (B, H, W, 3).
        """
        images = to_rgb_uint8_batch(images, name="Kontext source images")
        check_image_size(images.shape[1], images.shape[2], 2 * self.vae_factor, what="Kontext source image")
        return host_tree(_encode_image_jit(self._vae[0], self._vae[1], jnp.asarray(from_uint8(images))))

    def conditioning(self, prompts: Sequence[str], guidance: float = 3.5, sources=None,
                     source_latents=None) -> dict:
        """The ``cond`` pytree of `FluxLatentSpace.apply` for ``prompts`` (B entries).

        Kontext: ``sources`` are images (see `encode_sources`), or ``source_latents`` (B or 1, M, C)
        are their already encoded latents; one source (or latent) is repeated over the prompts.
        """
        if sources is not None and source_latents is not None:
            raise ValueError("give Kontext sources either as images (sources) or as latents (source_latents)")
        from arr_jax.diffusion.qwen_image_text import as_prompt_list

        prompts = as_prompt_list(prompts)
        emb = self.encode_prompts(prompts)
        b = len(prompts)
        cond = {"txt": jnp.asarray(emb["txt"]), "pooled": jnp.asarray(emb["pooled"])}
        if self.transformer.config.guidance_embeds:
            cond["guidance"] = jnp.full((b,), guidance, jnp.float32)
        if sources is not None or source_latents is not None:
            src = self.encode_sources(sources) if sources is not None else np.asarray(source_latents)
            if src.ndim != 3:
                raise ValueError(f"source_latents must be packed latents (B, M, C), got shape {src.shape}")
            if src.shape[0] == 1 and b > 1:
                src = np.repeat(src, b, axis=0)
            if src.shape[0] != b:
                raise ValueError(f"{src.shape[0]} source images for {b} prompts")
            cond["source"] = jnp.asarray(src, jnp.float32)
        return cond

    def noise(self, seeds: Sequence[int], space: FluxLatentSpace) -> jax.Array:
        """Initial packed latents (B, N, C): N(0, 1) from ``jax.random.key(seed)`` per sample."""
        return jnp.stack([jax.random.normal(jax.random.key(int(s)), space.latent_shape, jnp.float32) for s in seeds])

    def _put(self, tree):
        """Shard the batch dim over ("data", "fsdp") when a mesh is set and the batch divides."""
        r = self.rules
        if r is None or r.mesh is None:
            return tree
        n = int(np.prod([r.mesh.shape[a] for a in np.atleast_1d(r.rules["batch"])]))

        def put(x):
            spec = ("batch",) + (None,) * (x.ndim - 1) if x.shape[0] % n == 0 else (None,) * x.ndim
            return jax.device_put(x, r.sharding(spec))

        return jax.tree.map(put, tree)

    def _prepare(self, prompts, height, width, guidance, sources, seeds, latents):
        from arr_jax.diffusion.qwen_image_text import as_prompt_list

        prompts = as_prompt_list(prompts)
        if self.kind == "flux" and sources is not None:
            raise ValueError("source images given, but this snapshot is a text-to-image FluxPipeline")
        sources_u8 = None if sources is None else to_rgb_uint8_batch(sources, name="Kontext source images")
        if self.kind == "kontext" and sources_u8 is None:
            raise ValueError("the Kontext pipeline needs source images (sources=uint8 (B, H, W, 3))")
        if sources_u8 is not None:
            check_image_size(sources_u8.shape[1], sources_u8.shape[2], 2 * self.vae_factor,
                             what="Kontext source image")
        default = sources_u8.shape[1:3] if sources_u8 is not None else (128 * self.vae_factor,) * 2  # diffusers: 1024
        height, width = height or default[0], width or default[1]
        space = self.latent_space(height, width, None if sources_u8 is None else sources_u8.shape[1:3])
        cond = self.conditioning(prompts, guidance, sources_u8)
        if latents is None:
            seeds = list(range(len(prompts))) if seeds is None else list(seeds)
            if len(seeds) != len(prompts):
                raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
            latents = self.noise(seeds, space)
        latents = jnp.asarray(latents, jnp.float32)
        if latents.shape != (len(prompts),) + space.latent_shape:
            raise ValueError(f"latents {latents.shape} != (B, N, C) = {(len(prompts),) + space.latent_shape}")
        return space, self._put(cond), self._put(latents)

    # --- sampling -----------------------------------------------------------------------------
    def sample(self, prompts: Sequence[str], *, height: int | None = None, width: int | None = None,
               num_steps: int = 30, guidance: float = 3.5, seeds: Sequence[int] | None = None, latents=None,
               sources=None) -> SampleOutput:
        """Deterministic sampling (evaluation): FluxPipeline's Euler steps and sigmas.

        ``latents`` (B, N, C) override ``seeds``; ``sources`` (Kontext) are uint8 (B or 1, H, W, 3)
        (or any layout `encode_sources` takes);
        height/width default to the source size (Kontext), else to 1024 as in diffusers.
        """
        space, cond, x = self._prepare(prompts, height, width, guidance, sources, seeds, latents)
        sigmas, timesteps = flux_sigmas(num_steps, space.num_tokens, self.snap.scheduler)
        graphdef, state = nnx.split(self.transformer)
        x0 = _ode_jit(graphdef, state, space, x, cond, jnp.asarray(sigmas), jnp.asarray(timesteps))
        return SampleOutput(np.asarray(self.decode(x0, space)), np.asarray(x0))

    def rollout(self, prompts: Sequence[str], key: jax.Array, *, height: int | None = None,
                width: int | None = None, num_steps: int = 8, eta: float = 0.3, guidance: float = 3.5,
                sigmas=None, time_shift: float = 3.0, seeds=None, latents=None, sources=None,
                sde_kind: str = "dance", quantize_t: bool = True) -> tuple[Trajectory, np.ndarray]:
        """The RPO rollout: SDE steps with log-probs (SPEC §2). Returns (trajectory, images [-1, 1]).

        ``sigmas`` (T+1,) default to ``rollout_sigmas(num_steps, time_shift)``; the images are the
        decode of the last step's ``x0_hat``.
        """
        space, cond, x = self._prepare(prompts, height, width, guidance, sources, seeds, latents)
        sig = rollout_sigmas(num_steps, time_shift) if sigmas is None else np.asarray(sigmas, np.float32)
        graphdef, state = nnx.split(self.transformer)
        traj = _sde_jit(graphdef, state, x, cond, jnp.asarray(sig), key, space=space, eta=float(eta),
                         kind=sde_kind, quantize_t=quantize_t)
        return traj, np.asarray(self.decode(traj.x0, space))

    def decode(self, x0: jax.Array, space: FluxLatentSpace) -> jax.Array:
        """Packed latents (B, N, C) -> images (B, H, W, 3) float32 in ~[-1, 1]."""
        return _decode_jit(self._vae[0], self._vae[1], space, jnp.asarray(x0))


# ---------------------------------------------------------------------------- jitted programs

def _encode_text(clip_graph, clip_state, t5_graph, t5_state, clip_ids, t5_ids):
    """(B, 77), (B, L) token ids -> (T5 hidden (B, L, D), CLIP pooled (B, P)); FLUX passes no masks."""
    _, pooled = nnx.merge(clip_graph, clip_state)(clip_ids)
    txt = nnx.merge(t5_graph, t5_state)(t5_ids)
    return txt, pooled


def _ode(graphdef, state, space: FluxLatentSpace, x, cond, sigmas, timesteps):
    """Euler steps ``x += (sigma_next - sigma) * v(x, t)`` over the schedule; x (B, N, C) float32."""
    model = nnx.merge(graphdef, state)
    batch = x.shape[0]

    def body(x, i):
        v = space.apply(model, x, jnp.full((batch,), timesteps[i]), cond)
        return ode_step(v, x, sigmas[i], sigmas[i + 1]), None

    x, _ = jax.lax.scan(body, x.astype(jnp.float32), jnp.arange(timesteps.shape[0]))
    return x


def _sde(graphdef, state, x, cond, sigmas, key, *, space: FluxLatentSpace, eta: float, kind: str,
         quantize_t: bool) -> Trajectory:
    model = nnx.merge(graphdef, state)
    return sde_rollout(lambda x, t: space.apply(model, x, t, cond), x, sigmas, eta, key, kind=kind,
                       quantize_t=quantize_t)


def _decode(vae_graph, vae_state, space: FluxLatentSpace, x0):
    vae = nnx.merge(vae_graph, vae_state)
    h, w = space.grid
    z = vae.unscale_latents(unpack_latents(x0.astype(jnp.float32), h, w))
    return vae.decode(z)


def _encode_image(vae_graph, vae_state, images):
    """images (B, H, W, 3) in [-1, 1] -> packed, scaled posterior means (B, M, C) (Kontext's argmax mode)."""
    vae = nnx.merge(vae_graph, vae_state)
    return pack_latents(vae.scale_latents(vae.encode(images)))


# One jit per program (graphdefs and the latent space are static), shared by all pipelines.
_encode_text_jit = jax.jit(_encode_text, static_argnums=(0, 2))
_ode_jit = jax.jit(_ode, static_argnums=(0, 2))
_sde_jit = jax.jit(_sde, static_argnames=("graphdef", "space", "eta", "kind", "quantize_t"))
_decode_jit = jax.jit(_decode, static_argnums=(0, 2))
_encode_image_jit = jax.jit(_encode_image, static_argnums=(0,))
