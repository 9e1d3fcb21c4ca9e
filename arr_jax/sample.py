"""Sample images from a FLUX.1-dev (or FLUX.1-Kontext) snapshot: one PNG per image plus a grid.

    python -m arr_jax.sample --config configs/flux_dev_t2i.py \
        --config.model_dir=/path/to/FLUX.1-dev --config.prompts_file=prompts.txt [--config.lora_path=lora.safetensors]
    python -m arr_jax.sample --config configs/flux_kontext.py --config.model_dir=/path/to/FLUX.1-Kontext-dev \
        --config.prompts_file=edits.txt --config.sources_file=sources.txt

Writes ``outdir/00000_s0.png`` ... (prompt index, seed), ``outdir/grid.png`` and
``outdir/samples.json`` (file -> prompt, seed, source). Prompt embeddings are cached in
``cache_dir``, so a rerun on the same prompts skips T5/CLIP.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def read_lines(path: str, what: str) -> list[str]:
    if not path:
        raise ValueError(f"set --config.{what} (a text file with one entry per line)")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {p} does not exist")
    lines = [l.strip() for l in p.read_text().splitlines()]
    lines = [l for l in lines if l]
    if not lines:
        raise ValueError(f"{what} {p} has no non-empty lines")
    return lines


def load_image(path: str | Path) -> np.ndarray:
    """An image file -> uint8 (H, W, 3) RGB by `arr_jax.data.images.to_rgb_uint8` (transparency on
    white, 16-bit / float scaled); `ImageDecodeError` (a ValueError) naming the file."""
    from arr_jax.data.images import to_rgb_uint8

    return to_rgb_uint8(path)


def make_grid(images: np.ndarray, cols: int) -> np.ndarray:
    """uint8 (n, H, W, 3) -> one (rows*H, cols*W, 3) tiling (blank tail)."""
    n, h, w, c = images.shape
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * h, cols * w, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, cols)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = im
    return grid


def build_pipeline(cfg):
    """The `FluxPipeline` of ``cfg`` (mesh when there are several devices; LoRA from ``cfg.lora_path``)."""
    from arr_jax.convert.lora_peft import load_peft_lora, lora_config_from_file
    from arr_jax.policies.flux import load_pipeline
    from arr_jax.rpo.run import mesh_rules

    pipe = load_pipeline(cfg, mesh_rules(cfg), lora_config_from_file(cfg.lora_path) if cfg.lora_path else None)
    if cfg.lora_path:
        load_peft_lora(pipe.transformer, cfg.lora_path)
    return pipe


def run(cfg) -> list[Path]:
    """Sample every (prompt, image index) of ``cfg``; returns the written PNG paths (grid last)."""
    import jax
    from PIL import Image
    from tqdm.auto import tqdm

    from arr_jax.diffusion.flux_pipeline import to_uint8

    prompts = read_lines(cfg.prompts_file, "prompts_file")
    sources = None
    if cfg.kind == "flux_kontext":
        paths = read_lines(cfg.sources_file, "sources_file")
        if len(paths) != len(prompts):
            raise ValueError(f"sources_file has {len(paths)} lines but prompts_file has {len(prompts)}")
        sources = paths
    s = cfg.sample
    pipe = build_pipeline(cfg)
    jobs = [(i, cfg.seed + k) for i in range(len(prompts)) for k in range(s.images_per_prompt)]
    out = Path(cfg.outdir)
    out.mkdir(parents=True, exist_ok=True)
    written, images, index = [], [], {}
    key = jax.random.key(cfg.seed)
    for lo in tqdm(range(0, len(jobs), s.batch_size), desc="sampling", unit="batch", dynamic_ncols=True):
        batch = jobs[lo:lo + s.batch_size]
        pad = s.batch_size - len(batch)
        batch_p = batch + [batch[-1]] * pad  # one compiled shape
        ps = [prompts[i] for i, _ in batch_p]
        seeds = [sd * 100_003 + i for i, sd in batch_p]
        src = None
        if sources is not None:
            loaded = [load_image(sources[i]) for i, _ in batch_p]
            if len({im.shape for im in loaded}) > 1:
                raise ValueError(f"source images of one batch differ in size: "
                                 f"{ {sources[i]: im.shape for (i, _), im in zip(batch_p, loaded)} }; "
                                 f"use sample.batch_size=1 or same-size sources")
            src = np.stack(loaded)
        kw = dict(height=s.height or None, width=s.width or None, guidance=s.guidance, seeds=seeds, sources=src)
        if s.sampler == "ode":
            imgs = pipe.sample(ps, num_steps=s.num_steps, **kw).images
        elif s.sampler == "sde":
            _, imgs = pipe.rollout(ps, jax.random.fold_in(key, lo), num_steps=s.num_steps, eta=s.eta, **kw)
        else:
            raise ValueError(f"sample.sampler must be 'ode' or 'sde', got {s.sampler!r}")
        for (i, sd), noise_seed, im in zip(batch, seeds, to_uint8(imgs)[: len(batch)]):
            name = f"{i:05d}_s{sd}.png"
            Image.fromarray(im).save(out / name)
            written.append(out / name)
            images.append(im)
            index[name] = {"prompt": prompts[i], "seed": sd, "noise_seed": noise_seed,
                           "source": None if sources is None else sources[i]}
    if len({im.shape for im in images}) == 1:
        Image.fromarray(make_grid(np.stack(images), s.grid_cols)).save(out / "grid.png")
        written.append(out / "grid.png")
    (out / "samples.json").write_text(json.dumps(index, indent=1))
    st = pipe.stats
    print(f"wrote {len(images)} images to {out} (prompts encoded {st['encoded']}, cache hits {st['cache_hits']}, "
          f"truncated T5 {st['t5_truncated']} / CLIP {st['clip_truncated']})")
    return written


def main(argv) -> None:
    from arr_jax.cli import config_from_flags

    run(config_from_flags())


if __name__ == "__main__":
    from arr_jax.cli import run_main

    run_main(main)
