"""FLUX benchmark presets, and the same model built on both sides (ours in JAX, diffusers in PyTorch).

Presets (``--preset``):

  tiny      CPU, seconds: the test suite's tiny random snapshot shapes (1 double + 1 single block, width 32).
  small     CPU: a FLUX-shaped transformer of ~118M parameters (3 double + 6 single blocks, 6 heads x 128,
            RoPE axes 16/56/56 as FLUX.1-dev) at 128x128 with a 3-level VAE (factor 4: 256 image tokens)
            and 32 text tokens -- 288 tokens per sample, float32.
  flux-dev  GPU: FLUX.1-dev's published transformer and VAE configs (19 + 38 blocks, 24 x 128, T5 length
            512; 11.9B parameters) with random weights, bf16, 512x512.

``from: files`` presets are built with diffusers / transformers, perturbed and written with
``save_pretrained`` (cached under ``runs/benchmarks/snapshots/``), and both sides load that same
snapshot: the same weights. ``from: shapes`` presets (flux-dev) are too large to write and read back
within a GPU lease, so each side initialises random weights of the same shapes in place (ours by
one jitted init on the device, `arr_jax.models.flux.init_flux`); the work per step is identical,
the numbers are not. Prompt embeddings are the same arrays on both sides (computed once by our text
encoders from the snapshot, or random for ``shapes``): text encoding is outside every measurement.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests import _tiny_flux as tf  # noqa: E402  (tokenizers and the tiny shapes of the test suite)

# FLUX.1-dev's transformer/config.json and vae/config.json (black-forest-labs/FLUX.1-dev), the fields that matter.
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_DEV_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    layers_per_block=2, latent_channels=16, norm_num_groups=32, act_fn="silu", sample_size=1024,
                    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)

PRESETS = {
    "tiny": dict(
        source="files", dtype="float32", res=32, txt_len=tf.T5_MAX, steps=3, update_steps=3, rollout_batch=2,
        update_batch=2,
        lora_rank=4, lora_alpha=8.0, transformer=dict(tf.TRANSFORMER), vae=dict(tf.VAE), clip=dict(tf.CLIP),
        t5=dict(tf.T5), reps=2, device="cpu"),
    "small": dict(
        source="files", dtype="float32", res=128, txt_len=32, steps=8, update_steps=4, rollout_batch=4,
        update_batch=4,
        lora_rank=16, lora_alpha=32.0,
        transformer=dict(patch_size=1, in_channels=64, num_layers=3, num_single_layers=6, attention_head_dim=128,
                         num_attention_heads=6, joint_attention_dim=512, pooled_projection_dim=64,
                         guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        vae=dict(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=16, norm_num_groups=16, layers_per_block=1,
                 use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159),
        clip=dict(tf.CLIP, hidden_size=64, intermediate_size=128, projection_dim=64, num_attention_heads=4),
        t5=dict(d_model=512, d_kv=64, d_ff=1024, num_layers=1, num_heads=8, relative_attention_num_buckets=8,
                relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0),
        reps=3, device="cpu"),
    "flux-dev": dict(
        source="shapes", dtype="bfloat16", res=512, txt_len=512, steps=8, update_steps=8, rollout_batch=8,
        update_batch=8,
        lora_rank=16, lora_alpha=32.0, transformer=dict(FLUX_DEV_TRANSFORMER), vae=dict(FLUX_DEV_VAE),
        clip=None, t5=None, reps=2, device="gpu", scan_blocks=True),
}

LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")


def preset(name: str, **overrides) -> dict:
    """A copy of ``PRESETS[name]`` with ``overrides`` (None values ignored); transformer fields too:
    ``num_layers`` / ``num_single_layers`` override the block counts (for quick dry runs)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    p = copy.deepcopy(PRESETS[name])
    p["name"] = name
    for k, v in overrides.items():
        if v is None:
            continue
        if k in ("num_layers", "num_single_layers"):
            p["transformer"][k] = int(v)
        else:
            p[k] = v
    return p


def vae_factor(p: dict) -> int:
    return 2 ** (len(p["vae"]["block_out_channels"]) - 1)


def num_tokens(p: dict) -> int:
    """Image tokens + text tokens of one sample."""
    g = p["res"] // vae_factor(p) // 2
    return g * g + p["txt_len"]


def transformer_params(p: dict) -> int:
    """Parameters of the preset's transformer (from our model's abstract shapes; no weights made)."""
    import jax
    from flax import nnx

    from arr_jax.models.flux import FluxConfig, FluxTransformer
    from arr_jax.nn.lora import count_params

    cfg = FluxConfig.from_diffusers_config(p["transformer"])
    model = nnx.eval_shape(lambda: FluxTransformer(cfg, rngs=nnx.Rngs(0)))
    del jax
    return count_params(model)


# ---------------------------------------------------------------------------- snapshots (files)

def snapshot_dir(p: dict, root: str | Path = "runs/benchmarks/snapshots") -> Path:
    """Build (once; cached by the preset's shapes) and return the diffusers snapshot of a files preset."""
    spec = {k: p[k] for k in ("transformer", "vae", "clip", "t5", "txt_len")}
    key = hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:10]
    d = Path(root) / f"{p['name']}_{key}"
    if (d / "model_index.json").exists():
        return d
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    vocab, merges = tf.clip_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=tf.CLIP_MAX)
    tokenizer_2 = T5Tokenizer(vocab=tf.t5_pieces(), extra_ids=0, model_max_length=p["txt_len"])
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), eos_token_id=vocab["<|endoftext|>"],
                                        bos_token_id=vocab["<|startoftext|>"], pad_token_id=vocab["<|endoftext|>"],
                                        **p["clip"])).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), **p["t5"])).eval()
    transformer = FluxTransformer2DModel(**p["transformer"]).eval()
    vae = AutoencoderKL(**p["vae"]).eval()
    for m in (clip, t5, transformer, vae):
        tf._perturb(m, 0.02)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**tf.SCHEDULER), vae=vae, text_encoder=clip,
                        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer)
    tmp = d.with_name(d.name + ".tmp")
    tf.save_snapshot(pipe, tmp)
    tmp.rename(d)
    return d


def _flux_config_module():
    spec = importlib.util.spec_from_file_location("flux_dev_t2i", ROOT / "configs" / "flux_dev_t2i.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_config(p: dict, model_dir: str | Path | None, *, attention_impl: str = "xla", remat: bool | None = None):
    """The ``configs/flux_dev_t2i.py`` config of this preset (what ``python -m arr_jax.train`` would read)."""
    c = _flux_config_module().get_config("tiny")
    c.model_dir = str(model_dir or "")
    c.cache_dir = ""
    c.flux.dtype = p["dtype"]
    c.flux.text_dtype = c.flux.vae_dtype = "float32" if p["dtype"] == "float32" else "bfloat16"
    c.flux.vae_dtype = "float32" if p["dtype"] == "float32" else "bfloat16"
    c.flux.t5_max_length = p["txt_len"]
    c.flux.attention_impl = attention_impl
    if remat is None:
        remat = p["dtype"] != "float32"
    c.flux.remat = {True: "full", False: "none"}.get(remat, remat) if isinstance(remat, bool) else str(remat)
    c.flux.scan_blocks = bool(p.get("scan_blocks", False))
    c.rpo.height = c.rpo.width = p["res"]
    c.rpo.num_steps = p["steps"]
    c.rpo.lora_rank = p["lora_rank"]
    c.rpo.lora_alpha = p["lora_alpha"]
    return c


# ---------------------------------------------------------------------------- our side

def our_policy(p: dict, model_dir: str | Path | None, *, attention_impl: str = "xla", remat: bool | None = None,
               seed: int = 0):
    """Our `Policy` of the preset: `arr_jax.policies.flux.build` on the snapshot (files), or built from
    shapes with random weights (shapes; text conditioning random but fixed per prompt)."""
    c = run_config(p, model_dir, attention_impl=attention_impl, remat=remat)
    if p["source"] == "files":
        from arr_jax.policies.flux import build

        return build(c, None)
    return _policy_from_shapes(p, c, seed)


def _policy_from_shapes(p: dict, c, seed: int):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from arr_jax.diffusion.flux_pipeline import FluxLatentSpace, _decode
    from arr_jax.models.flux import FluxConfig, init_flux
    from arr_jax.models.vae import AutoencoderKL, VAEConfig
    from arr_jax.nn.lora import LoRAConfig
    from arr_jax.policies.base import Policy

    dt = getattr(jnp, p["dtype"])
    lora = LoRAConfig(rank=p["lora_rank"], alpha=p["lora_alpha"], targets=LORA_TARGETS)
    fcfg = FluxConfig.from_diffusers_config(p["transformer"], dtype=dt, param_dtype=dt, lora=lora,
                                            attention_impl=c.flux.attention_impl, remat=c.flux.remat,
                                            scan_blocks=c.flux.scan_blocks)
    model = init_flux(fcfg, seed=seed)
    vcfg = VAEConfig.from_dict(dict(p["vae"], _class_name="AutoencoderKL"))
    vae = jax.jit(lambda: nnx.state(AutoencoderKL(vcfg, dtype=dt, rngs=nnx.Rngs(seed + 1))))()
    vae_graph = nnx.graphdef(nnx.eval_shape(lambda: AutoencoderKL(vcfg, dtype=dt, rngs=nnx.Rngs(0))))
    space = FluxLatentSpace(p["res"], p["res"], vae_factor(p), vcfg.latent_channels)
    rng = np.random.default_rng(seed)
    table: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def embed(text):
        if text not in table:
            table[text] = (rng.standard_normal((p["txt_len"], fcfg.joint_attention_dim)).astype(np.float32),
                           rng.standard_normal((fcfg.pooled_projection_dim,)).astype(np.float32))
        return table[text]

    def encode_fn(items):
        e = [embed(it.text) for it in items]
        return {"txt": jnp.asarray(np.stack([a for a, _ in e]), dt), "pooled": jnp.asarray(np.stack([b for _, b in e]), dt),
                "guidance": jnp.full((len(items),), c.rpo.guidance, jnp.float32)}

    def decode_fn(vae_state, x0):
        img = _decode(vae_graph, vae_state, space, x0)
        return jnp.clip(jnp.round((img + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    return Policy(kind="flux", model=model, apply_fn=space.apply, encode_fn=encode_fn, decode_fn=decode_fn,
                  decode_params=vae, latent_shape=space.latent_shape, info={"space": space})


class NoJudge:
    """A judge that is never asked (rollout / update benchmarks need none)."""

    def compare(self, prompts, images1, images2, **kw):
        raise RuntimeError("the rollout/update benchmarks judge nothing")


def prompts(n: int) -> list[str]:
    words = ["a red cat", "a blue dog", "the big photo", "a cat and a dog", "red and blue", "the dog on a cat"]
    return [f"{words[i % len(words)]} {i}" for i in range(n)]


# ---------------------------------------------------------------------------- the PyTorch side

def torch_device(p: dict) -> str:
    import torch

    return "cuda" if torch.cuda.is_available() and p["device"] == "gpu" else "cpu"


def torch_dtype(p: dict):
    import torch

    return getattr(torch, p["dtype"])


def torch_transformer(p: dict, model_dir: str | Path | None):
    """diffusers' FluxTransformer2DModel of the preset on the benchmark device (the snapshot's weights, or
    random weights of the shapes)."""
    import torch
    from diffusers import FluxTransformer2DModel

    dev, dt = torch_device(p), torch_dtype(p)
    if p["source"] == "files":
        return FluxTransformer2DModel.from_pretrained(Path(model_dir) / "transformer", torch_dtype=dt).to(dev)
    torch.manual_seed(0)
    with torch.device(dev):
        return FluxTransformer2DModel(**p["transformer"]).to(dt)


def torch_pipeline(p: dict, model_dir: str | Path | None):
    """diffusers' FluxPipeline (transformer + VAE + scheduler; prompts come as embeddings)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    dev, dt = torch_device(p), torch_dtype(p)
    transformer = torch_transformer(p, model_dir)
    if p["source"] == "files":
        vae = AutoencoderKL.from_pretrained(Path(model_dir) / "vae", torch_dtype=dt).to(dev)
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(Path(model_dir) / "scheduler")
    else:
        with torch.device(dev):
            vae = AutoencoderKL(**p["vae"]).to(dt)
        sched = FlowMatchEulerDiscreteScheduler(**tf.SCHEDULER)
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    del torch
    return pipe


def to_torch(x, p: dict, dtype=None):
    import torch

    t = torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32)))
    return t.to(torch_device(p), dtype or torch_dtype(p))
