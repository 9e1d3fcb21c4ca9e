"""Sample images from a FLUX.1-dev / FLUX.1-Kontext or Qwen-Image / Qwen-Image-Edit(-2509) snapshot:
one PNG per image plus a grid.

    python -m arr_jax.sample --config configs/flux_dev_t2i.py \
        --config.model_dir=/path/to/FLUX.1-dev --config.prompts_file=prompts.txt [--config.lora_path=lora.safetensors]
    python -m arr_jax.sample --config configs/flux_kontext.py --config.model_dir=/path/to/FLUX.1-Kontext-dev \
        --config.prompts_file=edits.txt --config.sources_file=sources.txt
    python -m arr_jax.sample --config configs/qwen_image_edit.py --config.model_dir=/path/to/Qwen-Image-Edit-2509 \
        --config.prompts_file=edits.jsonl

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
    """An RGB image file -> uint8 (H, W, 3)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


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
    import jax

    from arr_jax.convert.lora_peft import load_peft_lora, lora_config_from_file
    from arr_jax.diffusion.flux_pipeline import FluxPipeline

    rules = None
    if jax.device_count() > 1:
        from arr_jax.sharding import make_mesh, make_rules

        rules = make_rules(make_mesh(**cfg.mesh.to_dict()))
    lora = lora_config_from_file(cfg.lora_path) if cfg.lora_path else None
    f = cfg.flux
    pipe = FluxPipeline.from_pretrained(
        cfg.model_dir, cache_dir=cfg.cache_dir or None, rules=rules, dtype=f.dtype, text_dtype=f.text_dtype,
        vae_dtype=f.vae_dtype, t5_max_length=f.t5_max_length, lora=lora, expect=cfg.kind,
        attention_impl=f.attention_impl, remat=f.remat)
    if cfg.lora_path:
        load_peft_lora(pipe.transformer, cfg.lora_path)
    return pipe


def run(cfg) -> list[Path]:
    """Sample every (prompt, image index) of ``cfg``; returns the written PNG paths (grid last)."""
    import jax
    from PIL import Image
    from tqdm.auto import tqdm

    from arr_jax.diffusion.flux_pipeline import to_uint8

    if not cfg.model_dir:
        raise ValueError("set --config.model_dir to a diffusers FLUX snapshot directory")
    prompts = read_lines(cfg.prompts_file, "prompts_file")
    sources = None
    if cfg.kind == "kontext":
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


# ---------------------------------------------------------------------------- Qwen-Image

QWEN_KINDS = ("qwen_image_edit", "qwen_image")


def read_qwen_jobs(cfg) -> tuple[list[str], list[list[Path]]]:
    """(prompts, per prompt its source image paths) of ``cfg.prompts_file``, checked before any model loads.

    Editing: a .jsonl file, one ``{"prompt": ..., "source": "a.png" | ["a.png", "b.png"]}`` per line
    (paths relative to the file). Text-to-image (kind ``qwen_image``): a .txt (one prompt per line)
    or a .jsonl without sources. Errors name the file and line.
    """
    editing = cfg.kind == "qwen_image_edit"
    p = Path(cfg.prompts_file) if cfg.prompts_file else None
    if p is None:
        raise ValueError("set --config.prompts_file (a .jsonl file: one {\"prompt\": ..., \"source\": ...} per line)")
    if not p.exists():
        raise FileNotFoundError(f"prompts_file {p} does not exist")
    if p.suffix != ".jsonl":
        if editing:
            raise ValueError(f"prompts_file {p}: editing needs a .jsonl file with 'prompt' and 'source' on every line")
        return read_lines(str(p), "prompts_file"), []
    prompts, sources = [], []
    for n, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise ValueError(f"{where}: expected a JSON object with a non-empty 'prompt'")
        src = rec.get("source") or []
        src = [src] if isinstance(src, str) else list(src)
        if editing and not src:
            raise ValueError(f"{where}: no 'source' image, but {cfg.kind} edits images")
        if not editing and src:
            raise ValueError(f"{where}: a 'source' image, but kind {cfg.kind!r} is text-to-image")
        paths = [Path(x) if Path(x).is_absolute() else p.parent / x for x in map(str, src)]
        for x in paths:
            if not x.exists():
                raise FileNotFoundError(f"{where}: source image {x} does not exist (paths are relative to the file)")
        prompts.append(rec["prompt"].strip())
        sources.append(paths)
    if not prompts:
        raise ValueError(f"prompts_file {p} holds no prompts")
    return prompts, sources


def run_qwen_image(cfg) -> list[Path]:
    """Sample a Qwen-Image(-Edit) snapshot (``cfg.kind`` in `QWEN_KINDS`): per prompt ``images_per_prompt``
    images with ``cfg.sample``'s sampler (true CFG with ``negative_prompt``); returns the PNG paths (grid last).
    Too many sources, a source size the pipeline cannot take and a snapshot of another model are errors
    raised before sampling, naming the file and line."""
    import jax
    from PIL import Image
    from tqdm.auto import tqdm

    from arr_jax.convert.lora_peft import load_peft_lora, lora_config_from_file
    from arr_jax.convert.qwen_image_snapshot import read_qwen_model_index
    from arr_jax.diffusion.flux_pipeline import check_image_size, to_uint8
    from arr_jax.diffusion.qwen_image_pipeline import NAMES
    from arr_jax.diffusion.qwen_image_text import MAX_SOURCES
    from arr_jax.policies.qwen_image_edit import EXPECT, load_pipeline

    if not cfg.model_dir:
        raise ValueError("set --config.model_dir to a diffusers Qwen-Image(-Edit) snapshot directory")
    prompts, sources = read_qwen_jobs(cfg)
    kind, _ = read_qwen_model_index(cfg.model_dir)
    if kind not in EXPECT[cfg.kind]:
        from arr_jax.convert.snapshot import SnapshotError

        raise SnapshotError(f"{cfg.model_dir} holds a {NAMES[kind]} pipeline, but kind {cfg.kind!r} needs "
                            f"{' or '.join(NAMES[k] for k in EXPECT[cfg.kind])}")
    limit = cfg.qwen.max_sources or MAX_SOURCES[kind]
    for n, (p, srcs) in enumerate(zip(prompts, sources)):
        if len(srcs) > limit:
            raise ValueError(f"{cfg.prompts_file}: prompt {n + 1} ({p[:60]!r}) has {len(srcs)} source images, but "
                             f"{NAMES[kind]} takes at most {limit}")
        if not cfg.qwen.vae_area:  # the sources' own sizes
            for x in srcs:
                with Image.open(x) as im:
                    check_image_size(im.height, im.width, 16, what=f"source image {x}")
    rules = None
    if jax.device_count() > 1:
        from arr_jax.sharding import make_mesh, make_rules

        rules = make_rules(make_mesh(**cfg.mesh.to_dict()))
    pipe = load_pipeline(cfg, rules, lora_config_from_file(cfg.lora_path) if cfg.lora_path else None)
    if cfg.lora_path:
        load_peft_lora(pipe.transformer, cfg.lora_path)
    s = cfg.sample
    neg = s.negative_prompt or None
    jobs = [(i, cfg.seed + k) for i in range(len(prompts)) for k in range(s.images_per_prompt)]
    out = Path(cfg.outdir)
    out.mkdir(parents=True, exist_ok=True)
    written, images, index = [], [], {}
    key = jax.random.key(cfg.seed)
    for lo in tqdm(range(0, len(jobs), s.batch_size), desc="sampling", unit="batch", dynamic_ncols=True):
        batch = jobs[lo:lo + s.batch_size]
        ps = [prompts[i] for i, _ in batch]
        seeds = [sd * 100_003 + i for i, sd in batch]
        src = [[load_image(x) for x in sources[i]] for i, _ in batch] if sources else None
        kw = dict(height=s.height or None, width=s.width or None, seeds=seeds)
        if s.sampler == "ode":
            imgs = pipe.sample(ps, src, num_steps=s.num_steps, negative_prompt=neg, true_cfg_scale=s.true_cfg_scale,
                               **kw).images
        elif s.sampler == "sde":
            _, imgs = pipe.rollout(ps, jax.random.fold_in(key, lo), src, num_steps=s.num_steps, eta=s.eta, **kw)
        else:
            raise ValueError(f"sample.sampler must be 'ode' or 'sde', got {s.sampler!r}")
        for (i, sd), noise_seed, im in zip(batch, seeds, to_uint8(imgs)):
            name = f"{i:05d}_s{sd}.png"
            Image.fromarray(im).save(out / name)
            written.append(out / name)
            images.append(im)
            index[name] = {"prompt": prompts[i], "seed": sd, "noise_seed": noise_seed,
                           "sources": [str(x) for x in sources[i]] if sources else []}
    if len({im.shape for im in images}) == 1:
        Image.fromarray(make_grid(np.stack(images), s.grid_cols)).save(out / "grid.png")
        written.append(out / "grid.png")
    (out / "samples.json").write_text(json.dumps(index, indent=1))
    st = pipe.stats
    print(f"wrote {len(images)} images to {out} (prompts encoded {st['encoded']}, cache hits {st['cache_hits']}, "
          f"truncated {st['truncated']})")
    return written


def main(argv) -> None:
    from arr_jax.cli import config_from_flags

    cfg = config_from_flags()
    (run_qwen_image if cfg.kind in QWEN_KINDS else run)(cfg)


if __name__ == "__main__":
    from arr_jax.cli import run_main

    run_main(main)
