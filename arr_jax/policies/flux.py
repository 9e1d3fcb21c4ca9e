"""The ``flux`` (FLUX.1-dev text-to-image) and ``flux_kontext`` (FLUX.1-Kontext editing) policy kinds.

Built from a diffusers snapshot (``config.model_dir``) by `arr_jax.diffusion.flux_pipeline`:

* ``encode_fn``: T5 + CLIP embeddings from the pipeline's prompt cache (on disk under
  ``cache_dir``: each prompt is encoded once, across runs and resumes; in memory with several
  processes) and, for Kontext, the VAE-encoded source latents (B, M, 64) appended as conditioning
  (kept in memory per source image).
* ``apply_fn``: `FluxLatentSpace.apply` on packed latents (B, N, 64), the guidance embedding
  from ``rpo.guidance`` (no CFG, SPEC §2); Kontext's source tokens take part in the rollout,
  the reference pass and the update alike, so the on-policy ratio is exactly 1 there too.
* ``decode_fn(vae_state, x0)``: the VAE decode of the last ``x0_hat`` to uint8; the VAE
  weights are the argument ``vae_state`` (``decode_params``), not constants of the program.
* ``precompute``: encodes every prompt (and Kontext source) of the run up front (progress bar), then
  frees T5-XXL and CLIP (``flux.release_text_encoders``): later prompts come from the cache. With
  several processes this is the only encoding: it runs the same programs on every process.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import jax
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


def check_host_memory(model_dir: str | Path, what: str = "configs/flux_dev_t2i.py:tiny") -> None:
    """On a CPU machine, refuse a snapshot whose weights alone exceed the free memory (a full-size
    FLUX.1-dev is ~34 GB) with a message pointing at the ``:tiny`` variants, instead of running out
    of memory half-way through loading."""
    import os

    if jax.devices()[0].platform != "cpu":
        return
    need = sum(f.stat().st_size for f in Path(model_dir).rglob("*.safetensors"))
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if need > 0.9 * free:
        raise ValueError(f"{model_dir} holds {need / 1e9:.1f} GB of weights but this CPU machine has "
                         f"{free / 1e9:.1f} GB free: run it on a GPU or TPU, or try the same path on CPU with "
                         f"--config {what} and a tiny random snapshot (tests/_tiny_flux.py writes one)")


def load_pipeline(cfg, rules=None, lora=None, *, lora_seed: int = 0):
    """The `FluxPipeline` of ``cfg.model_dir`` (dtypes, attention, remat and scan_blocks from ``cfg.flux``)."""
    from arr_jax.diffusion.flux_pipeline import FluxPipeline

    if not cfg.model_dir:
        raise ValueError(f"set --config.model_dir to a diffusers {cfg.kind} snapshot directory "
                         "(e.g. black-forest-labs/FLUX.1-dev downloaded with `hf download`)")
    if Path(cfg.model_dir).is_dir():
        check_host_memory(cfg.model_dir)
    f = cfg.flux
    # With several processes every one encodes the same prompts in lockstep (the encoders are sharded
    # over all of them), so what is cached must be the same everywhere: memory only.
    cache_dir = (cfg.cache_dir or None) if jax.process_count() == 1 else None
    return FluxPipeline.from_pretrained(
        cfg.model_dir, cache_dir=cache_dir, rules=rules, dtype=f.dtype, text_dtype=f.text_dtype,
        vae_dtype=f.vae_dtype, t5_max_length=f.t5_max_length, lora=lora, lora_seed=lora_seed,
        expect=PIPELINE_KIND[cfg.kind], attention_impl=f.attention_impl, remat=f.remat,
        scan_blocks=bool(f.get("scan_blocks", False)))


def build(cfg, rules=None) -> Policy:
    """The FLUX / Kontext policy of ``cfg`` at ``rpo.height`` x ``rpo.width``."""
    from arr_jax.convert.snapshot import _files_fingerprint

    if cfg.kind not in PIPELINE_KIND:
        raise ValueError(f"flux policy: kind {cfg.kind!r} is not one of {sorted(PIPELINE_KIND)}")
    r = cfg.rpo
    long_prompts = cfg.flux.get("long_prompts", "error")
    if long_prompts not in ("error", "truncate"):
        raise ValueError(f"bad config value flux.long_prompts: {long_prompts!r} is not 'error' or 'truncate'")
    pipe = load_pipeline(cfg, rules, lora_config(r), lora_seed=cfg.seed)
    editing = cfg.kind == "flux_kontext"
    space = pipe.latent_space(r.height, r.width, (r.height, r.width) if editing else None)
    vae_graph, vae_state = nnx.split(pipe.snap.vae)
    sources: dict[str, np.ndarray] = {}  # source latents by image hash, all made by `precompute`

    def source_key(it: PromptItem) -> str:
        if it.source is None:
            raise ValueError(f"prompt {it.origin or it.text[:60]!r} has no source image, but the "
                             f"{cfg.kind} policy edits images (JSONL prompts need a 'source')")
        return hashlib.sha1(np.ascontiguousarray(it.source).tobytes()).hexdigest()

    def source_latents(items: Sequence[PromptItem]) -> np.ndarray:
        keys = [source_key(it) for it in items]
        missing = [it for it, k in zip(items, keys) if k not in sources]
        if missing:
            if jax.process_count() > 1:  # encoding only some processes' sources would hang the others
                raise RuntimeError(f"source of {missing[0].origin or missing[0].text[:60]!r} was not encoded up "
                                   "front (precompute); every prompt of a multi-process run must be known at start")
            encode_sources(missing)
        return np.stack([sources[k] for k in keys])

    def encode_sources(items: Sequence[PromptItem]) -> None:
        todo = list({source_key(it): it for it in items if source_key(it) not in sources}.items())
        n = max(pipe.encode_batch, 1)
        for lo in range(0, len(todo), n):  # fixed batches: the same programs on every process
            chunk = todo[lo:lo + n]
            imgs = np.stack([it.source for _, it in chunk] + [chunk[-1][1].source] * (n - len(chunk)))
            lat = pipe.encode_sources(imgs)
            for i, (k, _) in enumerate(chunk):
                sources[k] = np.asarray(lat[i])

    def encode_fn(items: Sequence[PromptItem]) -> dict:
        cond = pipe.conditioning([it.text for it in items], guidance=r.guidance)
        if editing:
            cond["source"] = jnp.asarray(source_latents(items), jnp.float32)
        return cond

    decode_fn = _decode_fn(vae_graph, space)

    def check_prompts(items: Sequence[PromptItem]) -> None:
        """Before any prompt is encoded: every Kontext prompt has a source of ``rpo.height x rpo.width``,
        and (``flux.long_prompts="error"``) no prompt is longer than T5's ``flux.t5_max_length`` tokens,
        which T5 would silently cut while the judge reads the whole prompt. One ValueError naming the
        first offending prompt's file:line."""
        if editing:
            for it in items:
                source_key(it)
                if tuple(np.shape(it.source)) != (r.height, r.width, 3):
                    raise ValueError(f"prompt {it.origin or repr(it.text[:60])}: source image is "
                                     f"{tuple(np.shape(it.source))}, the policy needs {(r.height, r.width, 3)} "
                                     "(rpo.height x rpo.width; arr_jax.data.prompts brings sources there)")
        if long_prompts != "error":
            return
        tok = pipe.snap.t5_tokenizer
        texts = list(dict.fromkeys(it.text for it in items))
        lengths = dict(zip(texts, tok(texts)[1].tolist())) if texts else {}
        over = [it for it in items if lengths[it.text] > tok.max_length]
        if over:
            it = over[0]
            n = len({o.text for o in over})
            raise ValueError(f"prompt {it.origin or repr(it.text[:60])} is {lengths[it.text]} T5 tokens, more than "
                             f"flux.t5_max_length={tok.max_length}" + (f" ({n} prompts are)" if n > 1 else "")
                             + ": T5 would see only its start while the judge reads all of it. Shorten it, or set "
                             "--config.flux.long_prompts=truncate to train on the cut prompts (diffusers' behaviour)")

    def precompute(items: Sequence[PromptItem]) -> None:
        """Before iteration 0: `check_prompts`, then every prompt (and Kontext source) encoded once."""
        from tqdm.auto import tqdm

        check_prompts(items)
        texts = list(dict.fromkeys(it.text for it in items))
        chunk = max(pipe.encode_batch, 1) * 8
        for lo in tqdm(range(0, len(texts), chunk), desc="text embeddings", unit="batch", dynamic_ncols=True,
                       disable=len(texts) <= chunk or jax.process_index() > 0):
            pipe.encode_prompts(texts[lo:lo + chunk])
        if editing:
            encode_sources(items)
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


def _decode_fn(vae_graph, space):
    """``decode_fn(vae_state, x0)``: the VAE decode of packed latents to uint8 (B, H, W, 3)."""
    from arr_jax.diffusion.flux_pipeline import _decode

    def decode_fn(vae_state, x0):
        img = _decode(vae_graph, vae_state, space, x0)
        return jnp.clip(jnp.round((img + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    return decode_fn


def abstract(cfg, rules=None):
    """The policy of ``cfg`` without weights (`arr_jax.policies.base.AbstractPolicy`), for `arr_jax.preflight`.

    Shapes come from ``cfg.model_dir``'s ``transformer/`` and ``vae/`` config.json when the snapshot is
    there, else from FLUX.1-dev's published architecture (`FluxConfig.flux_dev`, `VAEConfig`; Kontext
    shares it). Dtypes, attention, remat, scanned blocks and LoRA as `build` sets them; the
    conditioning is what ``encode_fn`` returns: T5 states (``flux.t5_max_length``, joint_dim) and the
    CLIP pooled vector in ``flux.text_dtype``, the guidance scale, and Kontext's source latents.
    """
    from arr_jax.convert.vae import read_vae_config
    from arr_jax.diffusion.flux_pipeline import FluxLatentSpace
    from arr_jax.models.flux import FluxConfig, FluxTransformer
    from arr_jax.models.vae import AutoencoderKL, VAEConfig
    from arr_jax.policies.base import AbstractPolicy, place_abstract

    if cfg.kind not in PIPELINE_KIND:
        raise ValueError(f"flux policy: kind {cfg.kind!r} is not one of {sorted(PIPELINE_KIND)}")
    f, r = cfg.flux, cfg.rpo
    snap = Path(cfg.model_dir) if cfg.get("model_dir", "") else None
    has = snap is not None and (snap / "transformer" / "config.json").is_file()
    dt = jnp.dtype(f.dtype)
    over = dict(dtype=dt, param_dtype=dt, lora=lora_config(r), attention_impl=f.attention_impl, remat=f.remat,
                scan_blocks=bool(f.get("scan_blocks", False)))
    fc = FluxConfig.from_diffusers_config(snap / "transformer", **over) if has else FluxConfig.flux_dev(**over)
    vc = read_vae_config(snap / "vae") if has and (snap / "vae" / "config.json").is_file() else VAEConfig()
    model = place_abstract(nnx.eval_shape(lambda: FluxTransformer(fc, rngs=nnx.Rngs(cfg.seed), rules=rules)), rules)
    vae = place_abstract(nnx.eval_shape(lambda: AutoencoderKL(vc, dtype=jnp.dtype(f.vae_dtype), rngs=nnx.Rngs(0),
                                                                rules=rules)), rules)
    editing = cfg.kind == "flux_kontext"
    space = FluxLatentSpace(r.height, r.width, vae.downsample_factor, vc.latent_channels,
                            (r.height, r.width) if editing else None)
    vae_graph, vae_state = nnx.split(vae)
    text = jnp.dtype(f.text_dtype)
    cond = {"txt": jax.ShapeDtypeStruct((f.t5_max_length, fc.joint_attention_dim), text),
            "pooled": jax.ShapeDtypeStruct((fc.pooled_projection_dim,), text)}
    if fc.guidance_embeds:
        cond["guidance"] = jax.ShapeDtypeStruct((), jnp.float32)
    if editing:
        cond["source"] = jax.ShapeDtypeStruct(space.latent_shape, jnp.float32)

    def encode_fn(items):
        raise RuntimeError("an abstract policy has no text encoders (arr_jax.preflight only compiles)")

    policy = Policy(kind=cfg.kind, model=model, apply_fn=space.apply, encode_fn=encode_fn,
                    decode_fn=_decode_fn(vae_graph, space), decode_params=vae_state, latent_shape=space.latent_shape,
                    is_editing=editing, identity={"kind": cfg.kind, "dtype": f.dtype})
    plan = {"flux_config": fc, "vae_config": vc}
    if has:
        from arr_jax.convert.clip_text import read_clip_text_config
        from arr_jax.convert.t5 import read_t5_config

        plan.update(t5_config=read_t5_config(snap / "text_encoder_2"), clip_config=read_clip_text_config(snap / "text_encoder"))
    return AbstractPolicy(policy, cond, source=str(snap) if has else "FLUX.1-dev published config (FluxConfig.flux_dev)",
                          plan_configs=plan)
