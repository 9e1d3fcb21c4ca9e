"""Qwen-Image-Edit-2509 editing in the memory plan: QwenImageTransformer with LoRA, Qwen2.5-VL-7B, the
Qwen-Image VAE.

The transformer's 60 dual-stream blocks are identical, so one is traced and counted 60 times.
Qwen2.5-VL-7B is counted without the LM head Qwen-Image never uses (`Qwen25VLEncoder`); the VAE as
`QwenImageVAE` holds it for still images (the last temporal tap of each causal 3-D kernel).
The workload (`WORKLOAD`, `arr_jax.memory.Workload.qwen_image_edit`) is SPEC §2's editing column as
`configs/qwen_image_edit.py` sets it: 16 pairs, T = 10, LoRA r32 / alpha 64, 512², one 512² source
whose latent tokens follow the target's, text states padded to ``qwen.text_len`` = 512 (the
instruction plus the 384² condition image's tokens).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from arr_jax.memory.shards import entries

if TYPE_CHECKING:
    from arr_jax.memory.policy import Workload

TITLE = "Qwen-Image-Edit-2509 (transformer + Qwen2.5-VL-7B + VAE)"
COMPONENTS = ("transformer", "lora", "text_encoder", "vae")
BIG_TEXT = "text_encoder"
BIG_TEXT_LABEL = "Qwen2.5-VL"
TEXT_ENCODERS = ("text_encoder",)  # what ``qwen.release_text_encoder`` frees once every prompt is cached
TEXT_LABEL = "Qwen-VL"            # column header of the judge table
TEXT_DESC = "Qwen2.5-VL-7B"
DIT_LABEL = "Qwen-Image"
WIDTHS = "Qwen-Image 3072, Qwen2.5-VL 3584"
RELEASE = "qwen.release_text_encoder"
# float32 feature maps of (H, W, top channels) the VAE decode holds per image, from libtpu's compiled decode:
# 1.24 GiB per device for 2 images of 512² (`python -m arr_jax.preflight --config configs/qwen_image_edit.py --topology=v6e-8`).
VAE_DECODE_MAPS = 6.6
JUDGE_IMAGES = 3                   # a pairwise editing prompt shows Image BASE (the source), 1 and 2

# `Workload` fields of the editing column (rpo.* and qwen.text_len of configs/qwen_image_edit.py).
WORKLOAD = dict(model="qwen_image_edit", pairs=16, num_steps=10, lora_rank=32, lora_alpha=64.0, txt_len=512,
                source_images=1)


def abstract_models(wl: "Workload", qwen_config=None, text_config=None, vae_config=None) -> dict:
    """``{name: [(shape, itemsize, axes, count), ...]}`` for transformer, lora, text_encoder, vae, plus
    ``_dit_config`` (the `QwenImageConfig` with ``wl``'s LoRA) and ``_vae_top_channels``.

    bf16 transformer and Qwen2.5-VL-7B, float32 VAE. ``qwen_config``: a `QwenImageConfig`,
    ``text_config``: a `Qwen25VLConfig`, ``vae_config``: a `QwenImageVAEConfig` (default: full size).
    """
    import jax.numpy as jnp
    from flax import nnx

    from arr_jax.models.qwen2_5_vl import Qwen25VLConfig, Qwen25VLEncoder
    from arr_jax.models.qwen_image import QwenImageConfig, QwenImageTransformer
    from arr_jax.models.qwen_image_vae import QwenImageVAE, QwenImageVAEConfig
    from arr_jax.nn.lora import LoRAConfig, LoRAParam
    from arr_jax.nn_filters import base_param_filter

    qc = qwen_config or QwenImageConfig(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    qc = qc.replace(lora=LoRAConfig(rank=wl.lora_rank, alpha=wl.lora_alpha))
    dit = nnx.eval_shape(lambda: QwenImageTransformer(qc.replace(num_layers=min(qc.num_layers, 1)), rngs=nnx.Rngs(0)))
    repeat = {"transformer_blocks": qc.num_layers}
    text = nnx.eval_shape(lambda: Qwen25VLEncoder(text_config or Qwen25VLConfig(), dtype=jnp.bfloat16,
                                                  rngs=nnx.Rngs(0)))
    vc = vae_config or QwenImageVAEConfig()
    vae = nnx.eval_shape(lambda: QwenImageVAE(vc, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    return {"transformer": entries(dit, base_param_filter(), repeat), "lora": entries(dit, LoRAParam, repeat),
            "text_encoder": entries(text, nnx.Param), "vae": entries(vae, nnx.Param), "_dit_config": qc,
            "_vae_top_channels": vc.base_dim * vc.dim_mult[0]}
