"""The ``qwen_image_edit`` policy kind: Qwen-Image-Edit / Qwen-Image-Edit-2509 editing (SPEC §2's editing column).

Built from a diffusers snapshot (``config.model_dir``: a QwenImageEditPipeline or
QwenImageEditPlusPipeline) by `arr_jax.diffusion.qwen_image_pipeline`:

* ``encode_fn(items)``: the Qwen2.5-VL hidden states of each templated instruction *with its source
  image* (the prompt cache, on disk under ``cache_dir``, keys on both), padded to ``qwen.text_len``
  with a mask (fixed, so the rollout and update compile once), and the source's normalised VAE
  latents (B, M, 64), kept in memory per source.
* ``apply_fn``: `QwenImageLatentSpace.apply` on packed latents (B, N, 64): target tokens, then the
  source tokens, no CFG (SPEC §2); the source takes part in the rollout, the reference pass and the
  update alike, so the on-policy ratio is exactly 1 here too.
* ``decode_fn(vae_state, x0)``: the VAE decode of the last ``x0_hat`` to uint8; the VAE weights are
  the argument ``vae_state`` (``decode_params``), not constants of the program.
* ``precompute(items)``: encodes every (prompt, source) of the run up front, then frees Qwen2.5-VL
  (``qwen.release_text_encoder``): later prompts come from the cache.

Sources arrive centre-cropped and resized to ``rpo.height x rpo.width`` (`arr_jax.data.prompts`);
the VAE sees them at that size (the output has the same size), the text encoder (Edit-2509) a copy
at ``qwen.condition_area`` pixels, Qwen-Image-Edit the same image the VAE sees.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from arr_jax.policies.base import Policy, PromptItem

EXPECT = {"qwen_image_edit": ("edit", "edit_plus"), "qwen_image": ("t2i",)}


def lora_config(r):
    """The LoRAConfig of an ``rpo`` config section (None for full fine-tuning)."""
    from arr_jax.nn.lora import LoRAConfig

    if r.get("full_finetune", False):
        return None
    return LoRAConfig(rank=r.lora_rank, alpha=r.lora_alpha, targets=tuple(r.lora_targets))


def load_pipeline(cfg, rules=None, lora=None, *, lora_seed: int = 0, vae_area: int | None | str = "config"):
    """The `QwenImagePipeline` of ``cfg.model_dir`` (dtypes, attention, remat and areas from ``cfg.qwen``).

    ``vae_area``: "config" takes ``qwen.vae_area`` (0 = keep each source's size); None keeps it.
    A snapshot of another model (or of text-to-image for the editing kind) is a `SnapshotError`.
    """
    from arr_jax.diffusion.qwen_image_pipeline import QwenImagePipeline

    if not cfg.model_dir:
        raise ValueError(f"set --config.model_dir to a diffusers {cfg.kind} snapshot directory "
                         "(e.g. Qwen/Qwen-Image-Edit-2509 downloaded with `hf download`)")
    q = cfg.qwen
    area = (q.vae_area or None) if vae_area == "config" else vae_area
    return QwenImagePipeline.from_pretrained(
        cfg.model_dir, cache_dir=cfg.cache_dir or None, rules=rules, vae_area=area, condition_area=q.condition_area,
        max_sources=q.max_sources or None, dtype=q.dtype, text_dtype=q.text_dtype, vae_dtype=q.vae_dtype, lora=lora,
        lora_seed=lora_seed, expect=EXPECT.get(cfg.kind, EXPECT["qwen_image_edit"]),
        attention_impl=q.attention_impl, remat=q.remat, scan_blocks=bool(q.get("scan_blocks", False)))


def build(cfg, rules=None) -> Policy:
    """The Qwen-Image-Edit policy of ``cfg`` at ``rpo.height`` x ``rpo.width`` with one source per prompt."""
    from arr_jax.convert.snapshot import _files_fingerprint
    from arr_jax.diffusion.qwen_image_text import pad_states

    if cfg.kind != "qwen_image_edit":
        raise ValueError(f"qwen_image_edit policy: kind {cfg.kind!r} is not 'qwen_image_edit'")
    r, q = cfg.rpo, cfg.qwen
    pipe = load_pipeline(cfg, rules, lora_config(r), lora_seed=cfg.seed, vae_area=None)
    size = (r.height, r.width)
    space = pipe.latent_space(r.height, r.width, (size,))
    vae_graph, vae_state = nnx.split(pipe.snap.vae)
    sources: OrderedDict[str, np.ndarray] = OrderedDict()

    def check(items: Sequence[PromptItem]) -> list[list[np.ndarray]]:
        out = []
        for it in items:
            name = it.origin or repr(it.text[:60])
            if it.source is None:
                raise ValueError(f"prompt {name} has no source image, but the qwen_image_edit policy edits images "
                                 f"(JSONL prompts need a 'source')")
            if tuple(it.source.shape) != size + (3,):
                raise ValueError(f"prompt {name}: source image is {tuple(it.source.shape)}, the policy needs "
                                 f"{size + (3,)} (rpo.height x rpo.width; arr_jax.data.prompts brings sources there)")
            out.append([it.source])
        return out

    def source_latents(items: Sequence[PromptItem]) -> np.ndarray:
        out = []
        for it in items:
            key = hashlib.sha1(np.ascontiguousarray(it.source).tobytes()).hexdigest()
            if key not in sources:
                sources[key] = pipe.encode_sources([[it.source]])[0]
                while len(sources) > 4096:
                    sources.popitem(last=False)
            out.append(sources[key])
        return np.stack(out)

    def text_states(items: Sequence[PromptItem]) -> list[np.ndarray]:
        srcs = check(items)
        _, cond_imgs, _ = pipe.prepare_sources(srcs)
        return pipe.prompts([it.text for it in items], cond_imgs)

    def check_lengths(items: Sequence[PromptItem], lengths: Sequence[int]) -> None:
        """One ValueError naming the first prompt (file:line) whose text states (with its source image)
        exceed ``qwen.text_len``, how many do, and the ``text_len`` that fits them all."""
        over = [(it, n) for it, n in zip(items, lengths) if n > q.text_len]
        if over:
            it, n = over[0]
            need = -(-max(n for _, n in over) // 64) * 64
            raise ValueError(f"prompt {it.origin or repr(it.text[:60])} gives {n} text states (with its source "
                             f"image), more than qwen.text_len={q.text_len}"
                             + (f" ({len(over)} prompts do)" if len(over) > 1 else "")
                             + f": shorten it, or set --config.qwen.text_len={need}")

    def encode_fn(items: Sequence[PromptItem]) -> dict:
        states = text_states(items)
        check_lengths(items, [s.shape[0] for s in states])
        txt, mask = pad_states(states, length=q.text_len)
        return {"txt": jnp.asarray(txt), "txt_mask": jnp.asarray(mask),
                "source": jnp.asarray(source_latents(items), jnp.float32)}

    decode_fn = _decode_fn(vae_graph, space)

    def precompute(items: Sequence[PromptItem]) -> None:
        """Before iteration 0: checks every prompt's source and text length (`check_lengths`, ValueError
        naming the prompt's file:line), then encodes each (prompt, source) once."""
        from tqdm.auto import tqdm

        todo = list({(it.text, hashlib.sha1(np.ascontiguousarray(it.source).tobytes()).hexdigest()): it
                     for it in items if it.source is not None}.values())
        check(items)  # every prompt has a source of the policy's size, before any is encoded
        for lo in range(0, len(todo), 64):  # every prompt's length, from the tokenizer: before any is encoded
            part = todo[lo:lo + 64]
            _, cond_imgs, _ = pipe.prepare_sources(check(part))
            check_lengths(part, pipe.prompts.state_lengths([it.text for it in part], cond_imgs))
        chunk = max(pipe.prompts.encode_batch, 1) * 8
        for lo in tqdm(range(0, len(todo), chunk), desc="text embeddings", unit="batch", dynamic_ncols=True,
                       disable=len(todo) <= chunk):
            text_states(todo[lo:lo + chunk])
        if q.get("release_text_encoder", True):
            pipe.prompts.release()

    def export_lora(model, path, metadata):
        from arr_jax.convert.lora_peft import save_peft_lora

        return save_peft_lora(model, path, prefix="transformer", metadata=metadata)

    identity = {"kind": cfg.kind, "pipeline": pipe.kind,
                "transformer": _files_fingerprint(pipe.snap.path / "transformer")[:16], "dtype": q.dtype,
                "height": r.height, "width": r.width, "text_len": q.text_len}
    return Policy(kind=cfg.kind, model=pipe.transformer, apply_fn=space.apply, encode_fn=encode_fn,
                  decode_fn=decode_fn, decode_params=vae_state, latent_shape=space.latent_shape,
                  export_lora=None if r.get("full_finetune", False) else export_lora, identity=identity,
                  is_editing=True, precompute=precompute, info={"model_dir": str(pipe.snap.path), "pipeline": pipe})


def _decode_fn(vae_graph, space):
    """``decode_fn(vae_state, x0)``: the VAE decode of packed latents to uint8 (B, H, W, 3)."""
    from arr_jax.diffusion.qwen_image_pipeline import decode_latents

    def decode_fn(vae_state, x0):
        img = decode_latents(nnx.merge(vae_graph, vae_state), space, x0)
        return jnp.clip(jnp.round((img + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    return decode_fn


def abstract(cfg, rules=None):
    """The policy of ``cfg`` without weights (`arr_jax.policies.base.AbstractPolicy`), for `arr_jax.preflight`.

    Shapes come from ``cfg.model_dir``'s ``transformer/``, ``vae/`` and ``text_encoder/`` config.json when
    the snapshot is there, else from Qwen-Image-Edit-2509's published architecture (`QwenImageConfig`,
    `QwenImageVAEConfig` and `Qwen25VLConfig` defaults). The conditioning is what ``encode_fn``
    returns: Qwen2.5-VL states padded to ``qwen.text_len`` with their mask, and the source latents.
    """
    import jax

    from arr_jax.convert.qwen_image_vae import read_qwen_vae_config
    from arr_jax.diffusion.qwen_image_pipeline import QwenImageLatentSpace
    from arr_jax.models.qwen2_5_vl import Qwen25VLConfig
    from arr_jax.models.qwen_image import QwenImageConfig, QwenImageTransformer
    from arr_jax.models.qwen_image_vae import QwenImageVAE, QwenImageVAEConfig
    from arr_jax.policies.base import AbstractPolicy, place_abstract

    if cfg.kind != "qwen_image_edit":
        raise ValueError(f"qwen_image_edit policy: kind {cfg.kind!r} is not 'qwen_image_edit'")
    from pathlib import Path

    r, q = cfg.rpo, cfg.qwen
    snap = Path(cfg.model_dir) if cfg.get("model_dir", "") else None
    has = snap is not None and (snap / "transformer" / "config.json").is_file()
    dt = jnp.dtype(q.dtype)
    over = dict(dtype=dt, param_dtype=dt, lora=lora_config(r), attention_impl=q.attention_impl, remat=q.remat,
                scan_blocks=bool(q.get("scan_blocks", False)))
    qc = (QwenImageConfig.from_diffusers_config(snap / "transformer", **over) if has
          else QwenImageConfig(**over))
    vc = read_qwen_vae_config(snap / "vae") if has else QwenImageVAEConfig()
    text_cfg = Qwen25VLConfig.from_dir(snap / "text_encoder") if has else Qwen25VLConfig()
    text_width = text_cfg.text.hidden_size
    model = place_abstract(nnx.eval_shape(lambda: QwenImageTransformer(qc, rngs=nnx.Rngs(cfg.seed), rules=rules)),
                           rules)
    vae = place_abstract(nnx.eval_shape(lambda: QwenImageVAE(vc, dtype=jnp.dtype(q.vae_dtype), rngs=nnx.Rngs(0),
                                                               rules=rules)), rules)
    size = (r.height, r.width)
    space = QwenImageLatentSpace(r.height, r.width, vae.downsample_factor, vc.z_dim, (size,))
    vae_graph, vae_state = nnx.split(vae)
    cond = {"txt": jax.ShapeDtypeStruct((q.text_len, text_width), jnp.dtype(q.text_dtype)),
            "txt_mask": jax.ShapeDtypeStruct((q.text_len,), jnp.bool_),
            "source": jax.ShapeDtypeStruct((space.num_tokens, space.latent_shape[1]), jnp.float32)}

    def encode_fn(items):
        raise RuntimeError("an abstract policy has no text encoder (arr_jax.preflight only compiles)")

    policy = Policy(kind=cfg.kind, model=model, apply_fn=space.apply, encode_fn=encode_fn,
                    decode_fn=_decode_fn(vae_graph, space), decode_params=vae_state, latent_shape=space.latent_shape,
                    is_editing=True, identity={"kind": cfg.kind, "dtype": q.dtype})
    return AbstractPolicy(policy, cond, source=str(snap) if has else "Qwen-Image-Edit-2509 published config",
                          plan_configs={"qwen_config": qc, "text_config": text_cfg, "vae_config": vc})
