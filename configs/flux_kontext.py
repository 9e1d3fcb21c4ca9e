"""FLUX.1-Kontext-dev image editing: ARR-RPO with source images, and sampling.

    python -m arr_jax.train --config configs/flux_kontext.py --config.model_dir=/path/to/FLUX.1-Kontext-dev \
        --config.prompts_file=edits.jsonl --config.eval.prompts_file=heldout_edits.jsonl \
        --config.judge.kind=qwen3_vl --config.judge.model_dir=/path/to/Qwen3-VL-8B-Instruct \
        --config.judge.rubric=runs/arr_edit/rubric.txt
    python -m arr_jax.sample --config configs/flux_kontext.py --config.model_dir=/path/to/FLUX.1-Kontext-dev \
        --config.prompts_file=edits.txt --config.sources_file=sources.txt

Training prompts are JSONL lines ``{"prompt": "make the car red", "source": "images/car.png"}`` (the
source path relative to the JSONL file); sources are centre-cropped and resized to
``rpo.height x rpo.width``, VAE-encoded and appended to the image tokens in the rollout, the
reference pass and the update; the judge sees each source as Image BASE first. For sampling,
``sources_file`` lists one source image per line, aligned with ``prompts_file``; image sides must
be multiples of 16 (no silent resizing); ``sample.height/width = 0`` keeps each source's size.
``rpo`` takes SPEC §2's editing column (written for Qwen-Image-Edit-2509), with the departures
listed in ``rpo.departures``. ``get_config("tiny")`` runs on CPU with a tiny random snapshot.
"""
import importlib.util
from pathlib import Path

import ml_collections

_spec = importlib.util.spec_from_file_location("flux_dev_t2i", Path(__file__).with_name("flux_dev_t2i.py"))
flux_dev_t2i = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flux_dev_t2i)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = flux_dev_t2i.get_config()
    c.kind = "flux_kontext"
    c.workdir = "runs/flux_kontext_rpo"
    c.outdir = "runs/samples/flux_kontext"
    c.sample.height = 0             # 0: the source image's size
    c.sample.width = 0
    c.sample.num_steps = 28         # diffusers' FluxKontextPipeline default
    c.sample.guidance = 2.5         # the Kontext model card's guidance
    c.rpo.learning_rate = 1e-5
    c.rpo.lora_rank = 32
    c.rpo.lora_alpha = 64.0
    c.rpo.kl_beta = 0.02
    c.rpo.num_steps = 10
    c.rpo.pairs_per_batch = 16
    c.rpo.guidance = 2.5
    c.rpo.departures = ("policy FLUX.1-Kontext-dev (paper: Qwen-Image-Edit-2509)",
                        "guidance embedding 2.5, no CFG (paper: CFG 4.0 for evaluation)",
                        "eval 28 steps (paper: 50)")
    c.eval.num_steps = 28
    c.eval.guidance = 2.5
    if arg == "tiny":
        flux_dev_t2i.apply_tiny(c)
        c.sample.height = c.sample.width = 0
        c.outdir = "runs/samples/tiny_kontext"
        c.workdir = "runs/tiny_kontext_rpo"
    elif arg not in (None, "", "default"):
        raise ValueError(f"unknown flux_kontext variant {arg!r}; use '' or 'tiny'")
    return c
