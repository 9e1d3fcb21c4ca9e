"""Qwen-Image-Edit-2509 (or Qwen-Image-Edit) editing: the paper's editing policy, ARR-RPO and sampling.

    python -m arr_jax.train --config configs/qwen_image_edit.py --config.model_dir=/path/to/Qwen-Image-Edit-2509 \
        --config.prompts_file=edits.jsonl --config.eval.prompts_file=heldout_edits.jsonl \
        --config.judge.kind=qwen3_vl --config.judge.model_dir=/path/to/Qwen3-VL-8B-Instruct \
        --config.judge.rubric=runs/arr_edit/rubric.txt
    python -m arr_jax.sample --config configs/qwen_image_edit.py --config.model_dir=/path/to/Qwen-Image-Edit-2509 \
        --config.prompts_file=edits.jsonl

Prompts are JSONL lines ``{"prompt": "make the car red", "source": "images/car.png"}`` (paths relative
to the JSONL file); for sampling with Edit-2509 ``source`` may list up to three images. Training
sources are centre-cropped and resized to ``rpo.height x rpo.width``; the judge sees each as Image
BASE first. ``rpo`` is SPEC §2's editing column (lr 1e-5, LoRA 32/64 on the attention projections,
beta 0.02, T = 10, 16 pairs per update, 512², no CFG in rollouts); ``sample`` / ``eval`` the paper's
evaluation sampler (50 steps, true CFG 4.0 with the negative prompt " "). Sampling resizes each
source as diffusers does (``qwen.vae_area``, ``qwen.condition_area``; ``qwen.vae_area = 0`` keeps
the source's size, which must then be a multiple of 16). ``kind = "qwen_image"`` with a Qwen-Image
snapshot samples text-to-image. ``get_config("tiny")`` runs on CPU with a tiny random snapshot.
"""
import importlib.util
from pathlib import Path

import ml_collections

_spec = importlib.util.spec_from_file_location("flux_dev_t2i", Path(__file__).with_name("flux_dev_t2i.py"))
flux_dev_t2i = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flux_dev_t2i)

# LoRA on the attention projections of both streams (diffusers' module names)
ATTENTION_LORA = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                  "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = flux_dev_t2i.get_config()
    c.kind = "qwen_image_edit"      # the snapshot must hold a QwenImageEdit(Plus)Pipeline; "qwen_image": t2i sampling
    c.workdir = "runs/qwen_image_edit_rpo"
    c.outdir = "runs/samples/qwen_image_edit"
    if "flux" in c:
        del c["flux"]

    # --- weights / numerics / geometry ----------------------------------------------------------
    c.qwen = ml_collections.ConfigDict()
    c.qwen.dtype = "bfloat16"       # transformer weights + matmuls
    c.qwen.text_dtype = "bfloat16"  # Qwen2.5-VL-7B
    c.qwen.vae_dtype = "float32"
    c.qwen.attention_impl = "xla"
    c.qwen.remat = "full"           # update remat per block: "full", "dots" or "none" (arr_jax.nn.remat)
    c.qwen.scan_blocks = True       # the 60 blocks stored stacked, one lax.scan: short compiles (RESULTS.md)
    c.qwen.text_len = 512           # training: text states padded to this (instruction + condition image)
    c.qwen.vae_area = 1024 * 1024   # sampling: sources resized to ~this area, aspect kept (0 = keep size)
    c.qwen.condition_area = 384 * 384  # Edit-2509: the text encoder's copy of each source
    c.qwen.max_sources = 0          # 0: the model's own limit (Edit 1, Edit-2509 3)
    c.qwen.release_text_encoder = True  # training: free Qwen2.5-VL once every prompt is cached

    # --- sampling: the paper's evaluation sampler ---------------------------------------------
    c.sample.height = 0             # 0: vae_area at the (last) source's aspect ratio, as diffusers
    c.sample.width = 0
    c.sample.num_steps = 50
    c.sample.true_cfg_scale = 4.0
    c.sample.negative_prompt = " "  # Qwen's recommended negative prompt ("" = no CFG)
    c.sample.batch_size = 1         # sources of different sizes cannot share a batch

    # --- RPO: SPEC §2's editing column -----------------------------------------------------------
    c.rpo.learning_rate = 1e-5
    c.rpo.lora_rank = 32
    c.rpo.lora_alpha = 64.0
    c.rpo.lora_targets = ATTENTION_LORA
    c.rpo.kl_beta = 0.02
    c.rpo.num_steps = 10
    c.rpo.pairs_per_batch = 16
    c.rpo.height = 512
    c.rpo.width = 512
    c.rpo.departures = ()
    if "eval" in c:
        c.eval.num_steps = 50
        c.eval.true_cfg_scale = 4.0

    if arg == "tiny":
        apply_tiny(c)
    elif arg not in (None, "", "default"):
        raise ValueError(f"unknown qwen_image_edit variant {arg!r}; use '' or 'tiny'")
    return c


def apply_tiny(c: ml_collections.ConfigDict) -> None:
    """CPU-sized settings for the tiny random snapshot of tests/_tiny_qwen_image.py (32x32, float32)."""
    c.flux = ml_collections.ConfigDict(dict(dtype="float32", text_dtype="float32", vae_dtype="float32",
                                            t5_max_length=16, remat="none"))
    flux_dev_t2i.apply_tiny(c)  # the shared CPU sizes (mesh, steps, batches, the tiny judge)
    del c["flux"]
    c.outdir = "runs/samples/tiny_qwen_image_edit"
    c.workdir = "runs/tiny_qwen_image_edit_rpo"
    c.qwen.dtype = c.qwen.text_dtype = c.qwen.vae_dtype = "float32"
    c.qwen.remat = "none"
    c.qwen.scan_blocks = False      # tiny: the per-block layout (tests cover both)
    c.qwen.text_len = 320
    c.qwen.vae_area = 64 * 64
    c.qwen.condition_area = 32 * 32
    c.sample.height = c.sample.width = 0
    c.sample.num_steps = 2
    c.sample.batch_size = 1
    c.rpo.lora_rank = 2
    c.rpo.lora_alpha = 4.0
    c.rpo.height = c.rpo.width = 32
    if "eval" in c:
        c.eval.num_steps = 2
