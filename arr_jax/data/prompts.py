"""Prompt sources for RPO training and evaluation: the world grammar, a text file or a JSONL file.

File formats (chosen by the extension):

* ``.txt``: one prompt per line; blank lines are skipped.
* ``.jsonl``: one JSON object per line with ``prompt`` (a non-empty string), optionally
  ``source`` (an image path, relative to the JSONL file: the image to edit) and ``category``.

Every problem (missing or empty file, a line that is not a JSON object, a line without a
prompt, a missing or unreadable source image) raises an error naming the file and line, when
the prompts are read: before anything is compiled.

The prompts of RPO iteration ``i`` are a deterministic function of ``(seed, i)``
(`iteration_prompts`), so a resumed run sees exactly the prompts it would have seen.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from arr_jax.policies.base import PromptItem


class PromptFileError(ValueError):
    """A prompts file (or a line of it) is unusable; the message names the file and line."""


def _read_source(path: Path, where: str, size: tuple[int, int] | None) -> np.ndarray:
    from arr_jax.judge.processor import load_image

    if not path.exists():
        raise PromptFileError(f"{where}: source image {path} does not exist")
    try:
        img = load_image(path)
    except ValueError as e:
        raise PromptFileError(f"{where}: source image {path} is unreadable: {e}") from None
    if size is not None and (img.height, img.width) != tuple(size):
        img = center_crop_resize(img, size)
    return np.asarray(img, np.uint8)


def center_crop_resize(img, size: tuple[int, int]):
    """A PIL image cropped to the aspect ratio of ``size`` (H, W) around its centre, then resized
    (Lanczos) to exactly ``size``: how editing sources of any size meet the training resolution."""
    from PIL import Image

    h, w = size
    scale = min(img.width / w, img.height / h)
    cw, ch = round(w * scale), round(h * scale)
    left, top = (img.width - cw) // 2, (img.height - ch) // 2
    return img.crop((left, top, left + cw, top + ch)).resize((w, h), Image.LANCZOS)


def read_prompt_file(path: str | Path, *, source_size: tuple[int, int] | None = None,
                     require_sources: bool = False) -> list[PromptItem]:
    """The prompts of a ``.txt`` or ``.jsonl`` file (see the module docstring).

    ``source_size`` (H, W): editing sources are centre-cropped and resized to it.
    ``require_sources``: every JSONL line must name a ``source`` (editing policies).
    Raises `PromptFileError` / `FileNotFoundError` naming the file and line.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"prompts file {p} does not exist")
    if p.suffix not in (".txt", ".jsonl"):
        raise PromptFileError(f"prompts file {p}: unknown format {p.suffix!r} (use .txt, one prompt per line, "
                              "or .jsonl with a 'prompt' per line)")
    if require_sources and p.suffix != ".jsonl":
        raise PromptFileError(f"prompts file {p}: an editing policy needs source images: use a .jsonl file with "
                              "'prompt' and 'source' (an image path relative to the file) on every line")
    items: list[PromptItem] = []
    for n, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1):
        where = f"{p}:{n}"
        if not line.strip():
            continue
        if p.suffix == ".txt":
            items.append(PromptItem(line.strip(), origin=where))
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise PromptFileError(f"{where}: expected a JSON object with a 'prompt', got {type(rec).__name__}")
        prompt = rec.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptFileError(f"{where}: no 'prompt' (a non-empty string) in {sorted(rec)}")
        source = None
        if rec.get("source") not in (None, ""):
            src = Path(str(rec["source"]))
            source = _read_source(src if src.is_absolute() else p.parent / src, where, source_size)
        elif require_sources:
            raise PromptFileError(f"{where}: no 'source' image, but this policy edits images")
        category = rec.get("category")
        items.append(PromptItem(prompt.strip(), source=source, origin=where,
                                category=None if category is None else str(category)))
    if not items:
        raise PromptFileError(f"prompts file {p} holds no prompts")
    return items


def world_prompts(split: str) -> list[PromptItem]:
    """The synthetic world's prompts: ``train`` (108) or ``heldout`` (36), never overlapping."""
    from arr_jax.world import spec

    prompts = {"train": spec.TRAIN_PROMPTS, "heldout": spec.HELDOUT_PROMPTS}.get(split)
    if prompts is None:
        raise ValueError(f"world prompts: unknown split {split!r} (expected 'train' or 'heldout')")
    return [PromptItem(p.text, category=p.shape, origin=f"world:{split}") for p in prompts]


def build_prompts(cfg, split: str) -> list[PromptItem]:
    """Training (``split="train"``: ``config.prompts_file``) or held-out (``"eval"``:
    ``config.eval.prompts_file``, the first ``eval.num_prompts`` when > 0) prompts; the world's
    grammar when the file is "" and the policy is the world. Editing policies need sources,
    brought to the training resolution."""
    path = cfg.get("prompts_file", "") if split == "train" else cfg.eval.get("prompts_file", "")
    key = "prompts_file" if split == "train" else "eval.prompts_file"
    limit = cfg.eval.get("num_prompts", 0) if split == "eval" else 0
    if not path:
        if cfg.kind == "world":
            return world_prompts("train" if split == "train" else "heldout")[: limit or None]
        raise ValueError(f"set --config.{key}: a .txt file (one prompt per line) or a .jsonl file "
                         f"('prompt'{', source' if cfg.kind != 'flux' else ''} per line) for the {cfg.kind} policy")
    editing = cfg.kind in ("flux_kontext", "qwen_image_edit")
    size = (cfg.rpo.height, cfg.rpo.width) if editing else None
    return read_prompt_file(path, source_size=size, require_sources=editing)[: limit or None]


def iteration_prompts(items: Sequence[PromptItem], seed: int, iteration: int, n: int) -> list[PromptItem]:
    """The ``n`` prompts of RPO iteration ``iteration``: drawn with replacement, a function of (seed, i)."""
    rng = np.random.default_rng([seed, 1, iteration])
    return [items[i] for i in rng.integers(0, len(items), n)]
