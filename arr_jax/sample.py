"""Sample images from a FLUX.1-dev / FLUX.1-Kontext or Qwen-Image / Qwen-Image-Edit(-2509) snapshot:
one PNG per image plus a grid.

    python -m arr_jax.sample --config configs/flux_dev_t2i.py \
        --config.model_dir=/path/to/FLUX.1-dev --config.prompts_file=prompts.txt [--config.lora_path=lora.safetensors]
    python -m arr_jax.sample --config configs/flux_kontext.py --config.model_dir=/path/to/FLUX.1-Kontext-dev \
        --config.prompts_file=edits.txt --config.sources_file=sources.txt
    python -m arr_jax.sample --config configs/qwen_image_edit.py --config.model_dir=/path/to/Qwen-Image-Edit-2509 \
        --config.prompts_file=edits.jsonl

Each run writes into its own folder under ``outdir``, named by what it is (`run_dir`):
``<lora>_<sampler><steps>_seed<seed>`` (``base_ode30_seed0``, ``flux_rpo-final_ode30_seed0`` for
``runs/flux_rpo/lora/final.safetensors``; ``-2``, ``-3`` ... when that name holds another run's
samples), so base and LoRA samples in one ``outdir`` never overwrite each other. In it:
``00000_s0.png`` ... (prompt index, seed), ``grid.png`` (editing: each source beside its edit) and
``samples.json`` (``settings``: model, LoRA, sampler, steps, guidance, seed, size, prompts file;
``images``: file -> prompt, seed, source). Prompt embeddings are cached in ``cache_dir``, so a rerun
on the same prompts skips T5/CLIP.

The paper's generation benchmarks, in the layouts their own scorers read (`arr_jax.data.benchmarks`):

    python -m arr_jax.sample --config configs/flux_dev_t2i.py --config.model_dir=/path/to/FLUX.1-dev \
        --config.sample.benchmark=geneval --config.sample.benchmark_path=geneval/prompts/evaluation_metadata.jsonl \
        --config.outdir=runs/geneval
    python -m arr_jax.sample --config configs/flux_dev_t2i.py --config.model_dir=/path/to/FLUX.1-dev \
        --config.sample.benchmark=dpg --config.sample.benchmark_path=ELLA/dpg_bench/prompts --config.outdir=runs/dpg

GenEval: ``outdir/00000/{metadata.jsonl, grid.png, samples/0000.png ...}`` (``sample.benchmark_samples``
per prompt, default 4); DPG-Bench: ``outdir/<id>.png``, a 2x2 grid of 4 samples. A rerun skips
the prompts already complete.
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


def read_jobs(cfg) -> tuple[list[str], list | None, list[str] | None]:
    """(prompts, sources, source names) to sample, checked before any model is loaded.

    ``prompts_file`` is a .txt (one prompt per line) or a .jsonl (``prompt``, and for editing
    ``source``: a path relative to the JSONL file, see `arr_jax.data.prompts`). For a .txt with an
    editing config, ``sources_file`` lists one source image per line, relative to that file.
    """
    editing = cfg.kind in ("flux_kontext", "qwen_image_edit")
    if not cfg.prompts_file:
        raise ValueError("set --config.prompts_file (a .txt file with one prompt per line, or a .jsonl file)")
    if Path(cfg.prompts_file).suffix == ".jsonl":
        from arr_jax.data.prompts import read_prompt_file

        items = read_prompt_file(cfg.prompts_file, require_sources=editing)
        if not editing:
            return [it.text for it in items], None, None
        return [it.text for it in items], [it.source for it in items], [it.origin for it in items]
    prompts = read_lines(cfg.prompts_file, "prompts_file")
    if not editing:
        return prompts, None, None
    base = Path(cfg.sources_file).parent if cfg.sources_file else Path(".")
    lines = read_lines(cfg.sources_file, "sources_file")
    if len(lines) != len(prompts):
        raise ValueError(f"sources_file {cfg.sources_file} has {len(lines)} lines but prompts_file "
                         f"{cfg.prompts_file} has {len(prompts)}")
    paths = [Path(x) if Path(x).is_absolute() else base / x for x in lines]
    for n, p in enumerate(paths, 1):
        if not p.exists():
            raise FileNotFoundError(f"{cfg.sources_file}:{n}: source image {p} does not exist (paths are "
                                    "relative to the sources file)")
    return prompts, [str(p) for p in paths], [str(p) for p in paths]


def load_image(path: str | Path) -> np.ndarray:
    """An image file -> uint8 (H, W, 3) RGB by `arr_jax.data.images.to_rgb_uint8` (transparency on
    white, 16-bit / float scaled); `ImageDecodeError` (a ValueError) naming the file."""
    from arr_jax.data.images import to_rgb_uint8

    return to_rgb_uint8(path)


def run_settings(cfg) -> dict:
    """What a sampling run is, as recorded in ``samples.json`` and compared by `run_dir`."""
    s = cfg.sample
    out = {"kind": cfg.kind, "model_dir": str(cfg.model_dir), "lora_path": str(cfg.lora_path or ""),
           "prompts_file": str(cfg.prompts_file), "sources_file": str(cfg.get("sources_file", "") or ""),
           "sampler": s.sampler, "num_steps": int(s.num_steps), "seed": int(cfg.seed),
           "images_per_prompt": int(s.images_per_prompt), "height": int(s.height or 0), "width": int(s.width or 0)}
    for k in ("guidance", "eta", "true_cfg_scale", "negative_prompt"):
        if k in s:
            out[k] = s[k]
    return out


def run_dir(outdir: str | Path, settings: dict) -> Path:
    """``outdir/<lora>_<sampler><steps>_seed<seed>``: this run's folder; a folder of that name holding
    another run's ``samples.json`` (other settings) is kept, and ``-2``, ``-3`` ... is used instead."""
    lora = settings["lora_path"]
    if not lora:
        tag = "base"
    else:
        lp = Path(lora)
        tag = f"{lp.parent.parent.name}-{lp.stem}" if lp.parent.name == "lora" and lp.parent.parent.name else lp.stem
    name = f"{tag}_{settings['sampler']}{settings['num_steps']}_seed{settings['seed']}"
    for n in range(1, 10_000):
        d = Path(outdir) / (name if n == 1 else f"{name}-{n}")
        f = d / "samples.json"
        if not f.exists():
            return d
        try:
            if json.loads(f.read_text()).get("settings") == json.loads(json.dumps(settings)):
                return d  # a rerun of the same run
        except (ValueError, AttributeError):
            pass
    raise ValueError(f"outdir {outdir}: too many sampling runs named {name}")


def beside(source: np.ndarray | list, image: np.ndarray) -> np.ndarray:
    """uint8 (H, W', 3): the source image(s), each resized to height H, left of ``image`` (H, W, 3)."""
    from PIL import Image

    h = image.shape[0]
    srcs = source if isinstance(source, list) else [source]
    parts = []
    for im in srcs:
        im = np.asarray(im if isinstance(im, np.ndarray) else load_image(im))
        w = max(1, round(im.shape[1] * h / im.shape[0]))
        parts.append(np.asarray(Image.fromarray(im).resize((w, h), Image.BICUBIC)))
    return np.concatenate(parts + [np.full((h, 2, 3), 255, np.uint8), image], axis=1)


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

    from arr_jax.progress import stage

    with stage(f"loading the {cfg.kind} weights from {cfg.model_dir}" + (f" and the LoRA {cfg.lora_path}"
                                                                         if cfg.lora_path else "")):
        pipe = load_pipeline(cfg, mesh_rules(cfg)[0], lora_config_from_file(cfg.lora_path) if cfg.lora_path else None)
        if cfg.lora_path:
            load_peft_lora(pipe.transformer, cfg.lora_path)
    return pipe


def mesh_batch(rules, batch_size: int) -> int:
    """The rows one sampling program runs: ``batch_size`` rounded up to a multiple of the devices the
    batch axis is sharded over (``rules.rules["batch"]``, e.g. data x fsdp; 1 without a mesh), so a
    batch always divides the mesh. Each batch holds ``batch_size`` jobs, padded (as the trainer pads
    its evaluation batches) by repeating its last job; the padding rows are computed and dropped."""
    if rules is None or rules.mesh is None:
        return int(batch_size)
    axes = rules.rules.get("batch")
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    n = int(np.prod([rules.mesh.shape[a] for a in axes]))
    return -(-int(batch_size) // n) * n


def _batch_note(cfg, size: int) -> None:
    if size != cfg.sample.batch_size:
        from arr_jax.progress import note

        note(f"each batch of sample.batch_size={cfg.sample.batch_size} prompts is padded to {size} rows (the "
             f"mesh's data-parallel devices); --config.sample.batch_size={size} would use them all")


def _first_batch(lo: int):
    """The first batch encodes its prompts and compiles the sampler and the decoder: it says so, with
    its seconds (`arr_jax.progress.stage`); later batches are counted by the sampling bar."""
    import contextlib

    from arr_jax.progress import stage

    return stage("first batch: encoding its prompts, compiling the sampler and the decoder") if lo == 0 \
        else contextlib.nullcontext()


def benchmark_sample_fn(cfg, pipe):
    """``(prompts, seeds) -> uint8 (B, H, W, 3)`` with ``cfg.sample``'s sampler (ODE; or the SDE, whose
    step noise comes from ``cfg.seed`` and the batch's first seed)."""
    import jax

    from arr_jax.diffusion.flux_pipeline import to_uint8

    s = cfg.sample
    kw = dict(height=s.height or None, width=s.width or None, guidance=s.guidance)
    key = jax.random.key(cfg.seed)

    def sample_fn(prompts, seeds):
        if s.sampler == "ode":
            return to_uint8(pipe.sample(prompts, num_steps=s.num_steps, seeds=seeds, **kw).images)
        _, imgs = pipe.rollout(prompts, jax.random.fold_in(key, seeds[0]), num_steps=s.num_steps, eta=s.eta,
                               seeds=seeds, **kw)
        return to_uint8(imgs)

    return sample_fn


def run_benchmark(cfg) -> list[Path]:
    """``cfg.sample.benchmark`` ("geneval" | "dpg"): read ``sample.benchmark_path``, write that benchmark's
    layout into ``cfg.outdir``; returns the written paths. Input errors come before the model loads."""
    from arr_jax.data import benchmarks

    s = cfg.sample
    if s.benchmark not in benchmarks.KINDS:
        raise ValueError(f"sample.benchmark must be '', 'geneval' or 'dpg', got {s.benchmark!r}")
    if cfg.kind != "flux":
        raise ValueError(f"sample.benchmark={s.benchmark!r} is text-to-image; this config's kind is {cfg.kind!r}")
    if s.sampler not in ("ode", "sde"):
        raise ValueError(f"sample.sampler must be 'ode' or 'sde', got {s.sampler!r}")
    if not s.benchmark_path:
        what = "GenEval's evaluation_metadata.jsonl" if s.benchmark == "geneval" else "DPG-Bench's prompts folder"
        raise ValueError(f"set --config.sample.benchmark_path ({what})")
    if s.benchmark == "dpg" and (not s.height or s.height != s.width):
        raise ValueError(f"DPG-Bench's scorer crops square samples: set sample.height = sample.width > 0 "
                         f"(got {s.height} x {s.width})")
    items = benchmarks.read_prompts(s.benchmark, s.benchmark_path)
    layout = benchmarks.make_layout(s.benchmark, cfg.outdir, n_samples=s.benchmark_samples, grid=s.benchmark_grid,
                                    resolution=s.height)
    if not cfg.model_dir:
        raise ValueError("set --config.model_dir to a diffusers FLUX snapshot directory")
    pipe = build_pipeline(cfg)
    res = benchmarks.write_benchmark(layout, items, benchmark_sample_fn(cfg, pipe), batch_size=s.batch_size,
                                     seed=cfg.seed)
    print(f"{s.benchmark}: {res.total} prompts in {layout.outdir} ({res.total - res.skipped} written, "
          f"{res.skipped} already complete); {layout.score_hint()}")
    return res.written


def run(cfg) -> list[Path]:
    """Sample every (prompt, image index) of ``cfg``; returns the written PNG paths (grid last).
    With ``cfg.sample.benchmark`` set, `run_benchmark` instead."""
    import jax
    from PIL import Image
    from tqdm.auto import tqdm

    from arr_jax.diffusion.flux_pipeline import to_uint8

    if cfg.sample.get("benchmark", ""):
        return run_benchmark(cfg)
    prompts, sources, source_names = read_jobs(cfg)
    s = cfg.sample
    pipe = build_pipeline(cfg)
    jobs = [(i, cfg.seed + k) for i in range(len(prompts)) for k in range(s.images_per_prompt)]
    settings = run_settings(cfg)
    out = run_dir(cfg.outdir, settings)
    out.mkdir(parents=True, exist_ok=True)
    written, images, index = [], [], {}
    key = jax.random.key(cfg.seed)
    size = mesh_batch(pipe.rules, s.batch_size)
    _batch_note(cfg, size)
    for lo in tqdm(range(0, len(jobs), s.batch_size), desc="sampling", unit="batch", dynamic_ncols=True):
        batch = jobs[lo:lo + s.batch_size]
        pad = size - len(batch)
        batch_p = batch + [batch[-1]] * pad  # one compiled shape, divisible by the mesh
        ps = [prompts[i] for i, _ in batch_p]
        seeds = [sd * 100_003 + i for i, sd in batch_p]
        src = None
        if sources is not None:
            loaded = [sources[i] if isinstance(sources[i], np.ndarray) else load_image(sources[i])
                      for i, _ in batch_p]
            if len({im.shape for im in loaded}) > 1:
                raise ValueError(f"source images of one batch differ in size: "
                                 f"{ {source_names[i]: im.shape for (i, _), im in zip(batch_p, loaded)} }; "
                                 f"use sample.batch_size=1 or same-size sources")
            src = np.stack(loaded)
        kw = dict(height=s.height or None, width=s.width or None, guidance=s.guidance, seeds=seeds, sources=src)
        with _first_batch(lo):
            if s.sampler == "ode":
                imgs = pipe.sample(ps, num_steps=s.num_steps, **kw).images
            elif s.sampler == "sde":
                _, imgs = pipe.rollout(ps, jax.random.fold_in(key, lo), num_steps=s.num_steps, eta=s.eta, **kw)
            else:
                raise ValueError(f"sample.sampler must be 'ode' or 'sde', got {s.sampler!r}")
            imgs = np.asarray(imgs)
        for (i, sd), noise_seed, im in zip(batch, seeds, to_uint8(imgs)[: len(batch)]):
            name = f"{i:05d}_s{sd}.png"
            Image.fromarray(im).save(out / name)
            written.append(out / name)
            images.append(im if sources is None else beside(src[batch.index((i, sd))], im))
            index[name] = {"prompt": prompts[i], "seed": sd, "noise_seed": noise_seed,
                           "source": None if sources is None else source_names[i]}
    if len({im.shape for im in images}) == 1:
        Image.fromarray(make_grid(np.stack(images), s.grid_cols)).save(out / "grid.png")
        written.append(out / "grid.png")
    (out / "samples.json").write_text(json.dumps({"settings": settings, "images": index}, indent=1))
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
    from arr_jax.data.images import image_size
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
                w, h = image_size(x)
                check_image_size(h, w, 16, what=f"source image {x}")
    from arr_jax.rpo.run import mesh_rules

    from arr_jax.progress import stage

    rules = mesh_rules(cfg)[0]
    with stage(f"loading the {NAMES[kind]} weights from {cfg.model_dir}" + (f" and the LoRA {cfg.lora_path}"
                                                                            if cfg.lora_path else "")):
        pipe = load_pipeline(cfg, rules, lora_config_from_file(cfg.lora_path) if cfg.lora_path else None)
        if cfg.lora_path:
            load_peft_lora(pipe.transformer, cfg.lora_path)
    s = cfg.sample
    neg = s.negative_prompt or None
    jobs = [(i, cfg.seed + k) for i in range(len(prompts)) for k in range(s.images_per_prompt)]
    settings = run_settings(cfg)
    out = run_dir(cfg.outdir, settings)
    out.mkdir(parents=True, exist_ok=True)
    written, images, index = [], [], {}
    key = jax.random.key(cfg.seed)
    size = mesh_batch(rules, s.batch_size)
    _batch_note(cfg, size)
    for lo in tqdm(range(0, len(jobs), s.batch_size), desc="sampling", unit="batch", dynamic_ncols=True):
        batch = jobs[lo:lo + s.batch_size]
        batch_p = batch + [batch[-1]] * (size - len(batch))  # one compiled shape, divisible by the mesh
        ps = [prompts[i] for i, _ in batch_p]
        seeds = [sd * 100_003 + i for i, sd in batch_p]
        src = [[load_image(x) for x in sources[i]] for i, _ in batch_p] if sources else None
        kw = dict(height=s.height or None, width=s.width or None, seeds=seeds)
        with _first_batch(lo):
            if s.sampler == "ode":
                imgs = pipe.sample(ps, src, num_steps=s.num_steps, negative_prompt=neg,
                                   true_cfg_scale=s.true_cfg_scale, **kw).images
            elif s.sampler == "sde":
                _, imgs = pipe.rollout(ps, jax.random.fold_in(key, lo), src, num_steps=s.num_steps, eta=s.eta, **kw)
            else:
                raise ValueError(f"sample.sampler must be 'ode' or 'sde', got {s.sampler!r}")
            imgs = np.asarray(imgs)
        for (i, sd), noise_seed, im in zip(batch, seeds, to_uint8(imgs)[: len(batch)]):
            name = f"{i:05d}_s{sd}.png"
            Image.fromarray(im).save(out / name)
            written.append(out / name)
            images.append(beside(src[batch.index((i, sd))], im) if src else im)
            index[name] = {"prompt": prompts[i], "seed": sd, "noise_seed": noise_seed,
                           "sources": [str(x) for x in sources[i]] if sources else []}
    if len({im.shape for im in images}) == 1:
        Image.fromarray(make_grid(np.stack(images), s.grid_cols)).save(out / "grid.png")
        written.append(out / "grid.png")
    (out / "samples.json").write_text(json.dumps({"settings": settings, "images": index}, indent=1))
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
