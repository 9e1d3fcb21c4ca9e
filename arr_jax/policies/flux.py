"""The ``flux`` (FLUX.1-dev text-to-image) and ``flux_kontext`` (FLUX.1-Kontext editing) policy kinds.

Built from a diffusers snapshot (``config.model_dir``) by `arr_jax.diffusion.flux_pipeline`:

* ``encode_fn``: T5 + CLIP embeddings from the pipeline's prompt cache (on disk under
  ``cache_dir``: each prompt is encoded once, across runs and resumes) and, for Kontext, the
  VAE-encoded source latents (B, M, 64) appended as conditioning (kept in memory per source).
* ``apply_fn``: `FluxLatentSpace.apply` on packed latents (B, N, 64), the guidance embedding
  from ``rpo.guidance`` (no CFG, SPEC §2); Kontext's source tokens take part in the rollout,
  the reference pass and the update alike, so the on-policy ratio is exactly 1 there too.
* ``decode_fn(vae_state, x0)``: the VAE decode of the last ``x0_hat`` to uint8; the VAE
  weights are the argument ``vae_state`` (``decode_params``), not constants of the program.
* ``precompute``: encodes every prompt of the run up front (progress bar), then frees T5-XXL and
  CLIP (``flux.release_text_encoders``): later prompts come from the cache.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from arr_jax.policies.base import Policy, PromptItem

PIPELINE_KIND = {"flux": "flux", "flux_kontext": "kontext"}


def lora_config(r):
    """The LoRAConfig of an ``rpo`` config section (None for full fine-tuning)."""
    from arr_jax.nn.lora import LoRAConfig

    if r.get("full_finetune", False):
        return None
    return LoRAConfig(rank=r.lora_rank, alpha=r.lora_alpha, targets=tuple(r.lora_targets))


def load_pipeline(cfg, rules=None, lora=None, *, lora_seed: int = 0):
    """The `FluxPipeline` of ``cfg.model_dir`` (dtypes, attention, remat and scan_blocks from ``cfg.flux``)."""
    from arr_jax.diffusion.flux_pipeline import FluxPipeline

    if not cfg.model_dir:
        raise ValueError(f"set --config.model_dir to a diffusers {cfg.kind} snapshot directory "
                         "(e.g. black-forest-labs/FLUX.1-dev downloaded with `hf download`)")
    f = cfg.flux
    return FluxPipeline.from_pretrained(
        cfg.model_dir, cache_dir=cfg.cache_dir or None, rules=rules, dtype=f.dtype, text_dtype=f.text_dtype,
        vae_dtype=f.vae_dtype, t5_max_length=f.t5_max_length, lora=lora, lora_seed=lora_seed,
        expect=PIPELINE_KIND[cfg.kind], attention_impl=f.attention_impl, remat=f.remat,
        scan_blocks=bool(f.get("scan_blocks", False)))


def build(cfg, rules=None) -> Policy:
    """The FLUX / Kontext policy of ``cfg`` at ``rpo.height`` x ``rpo.width``."""
    from arr_jax.convert.snapshot import _files_fingerprint
    from arr_jax.diffusion.flux_pipeline import _decode

    if cfg.kind not in PIPELINE_KIND:
        raise ValueError(f"flux policy: kind {cfg.kind!r} is not one of {sorted(PIPELINE_KIND)}")
    r = cfg.rpo
    pipe = load_pipeline(cfg, rules, lora_config(r), lora_seed=cfg.seed)
    editing = cfg.kind == "flux_kontext"
    space = pipe.latent_space(r.height, r.width, (r.height, r.width) if editing else None)
    vae_graph, vae_state = nnx.split(pipe.snap.vae)
    sources: OrderedDict[str, np.ndarray] = OrderedDict()

    def source_latents(items: Sequence[PromptItem]) -> np.ndarray:
        out = []
        for it in items:
            if it.source is None:
                raise ValueError(f"prompt {it.origin or it.text[:60]!r} has no source image, but the "
                                 f"{cfg.kind} policy edits images (JSONL prompts need a 'source')")
            key = hashlib.sha1(np.ascontiguousarray(it.source).tobytes()).hexdigest()
            if key not in sources:
                sources[key] = pipe.encode_sources(it.source[None])[0]
                while len(sources) > 4096:
                    sources.popitem(last=False)
            out.append(sources[key])
        return np.stack(out)

    def encode_fn(items: Sequence[PromptItem]) -> dict:
        cond = pipe.conditioning([it.text for it in items], guidance=r.guidance)
        if editing:
            cond["source"] = jnp.asarray(source_latents(items), jnp.float32)
        return cond

    def decode_fn(vae_state, x0):
        img = _decode(vae_graph, vae_state, space, x0)
        return jnp.clip(jnp.round((img + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    def precompute(items: Sequence[PromptItem]) -> None:
        from tqdm.auto import tqdm

        texts = list(dict.fromkeys(it.text for it in items))
        chunk = max(pipe.encode_batch, 1) * 8
        for lo in tqdm(range(0, len(texts), chunk), desc="text embeddings", unit="batch", dynamic_ncols=True,
                       disable=len(texts) <= chunk):
            pipe.encode_prompts(texts[lo:lo + chunk])
        if cfg.flux.get("release_text_encoders", True):
            pipe.release_text_encoders()

    def export_lora(model, path, metadata):
        from arr_jax.convert.lora_peft import save_peft_lora

        return save_peft_lora(model, path, prefix="transformer", metadata=metadata)

    identity = {"kind": cfg.kind, "transformer": _files_fingerprint(pipe.snap.path / "transformer")[:16],
                "dtype": cfg.flux.dtype, "height": r.height, "width": r.width}
    return Policy(kind=cfg.kind, model=pipe.transformer, apply_fn=space.apply, encode_fn=encode_fn,
                  decode_fn=decode_fn, decode_params=vae_state, latent_shape=space.latent_shape,
                  export_lora=None if r.get("full_finetune", False) else export_lora, identity=identity,
                  is_editing=editing, precompute=precompute,
                  info={"model_dir": str(pipe.snap.path), "pipeline": pipe})
