"""Generation benchmarks, ready to score: benchmark prompt files in, the scorers' own folder layouts out.

The paper reports GenEval and DPG-Bench for FLUX.1-dev before and after RPO (SPEC §2). This module
reads each benchmark's prompt files and writes images exactly where that benchmark's own scorer
looks for them, so a user runs the scorer unchanged on our images.

**GenEval** (github.com/djghosh13/geneval). Prompts: ``prompts/evaluation_metadata.jsonl``, one
JSON object per line (``tag``, ``include``, ``exclude``, ``prompt``, ...). Layout, as documented in
its README ("Image generation") and written by ``generation/diffusers_generate.py``::

    <outdir>/00000/metadata.jsonl      the 0-th metadata line, verbatim
    <outdir>/00000/grid.png            optional (the scorer ignores it)
    <outdir>/00000/samples/0000.png    N samples (GenEval's default N = 4)
    <outdir>/00001/...

Folder ``i`` (5 digits) holds the i-th JSON line of the metadata file. The scorer,
``evaluation/evaluate_images.py``, walks the sub-folders whose names are all digits, ``json.load``s
their ``metadata.jsonl`` and scores every file in ``samples/`` that ``re.match(r"\\d+\\.png")``
accepts. Sample names follow the README's 4 digits (``0000.png``; the generation script writes 5,
``00000.png``; both match the scorer's pattern).

**DPG-Bench** (github.com/TencentQQGYLab/ELLA, ``dpg_bench/``). Prompts: ``dpg_bench/prompts/<id>.txt``,
one prompt per file. Layout, as its README asks ("generate 4 images per prompt and grid them to 2x2
format", file name = prompt file name) and as ``dpg_bench/compute_dpg_bench.py`` reads it::

    <outdir>/<id>.png                  a 2x2 grid of 4 samples, each R x R -> (2R, 2R) pixels

The scorer lists *every* file in the folder (so nothing else is written there), takes the item id
as the file name before its first ``.``, and crops sample k of ``--pic-num`` at the boxes
``(0, 0, R, R)``, ``(R, 0, 2R, R)``, ``(0, R, R, 2R)``, ``(R, R, 2R, 2R)`` for ``--resolution R``:
row-major, sample k at grid row ``k // 2``, column ``k % 2``. Score with
``bash dpg_bench/dist_eval.sh <outdir> R`` (its ``PIC_NUM`` defaults to 4).

**Runs are resumable.** Noise seeds are a function of (run seed, prompt text, sample index) alone
(`noise_seed`), so a prompt's images do not depend on batching, file order or earlier runs; a
prompt whose folder (GenEval) or grid (DPG) is complete is skipped; every PNG is written under a
temporary ``.partial-*`` name and renamed, and leftovers of a killed run are removed at start.
GenEval's ``metadata.jsonl`` is written last and marks its folder complete.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

KINDS = ("geneval", "dpg")
GENEVAL_SAMPLES = 4   # diffusers_generate.py's --n_samples default
DPG_SAMPLES = 4       # a 2x2 grid; dist_eval.sh's PIC_NUM default
_PARTIAL = ".partial-"

# (prompts, noise seeds) -> uint8 (B, H, W, 3), one image per prompt.
SampleFn = Callable[[list[str], list[int]], np.ndarray]


class BenchmarkFormatError(ValueError):
    """A benchmark prompt file or output folder that does not have the expected form (names the file)."""


@dataclasses.dataclass(frozen=True)
class BenchmarkPrompt:
    """One benchmark item.

    ``key``: the output name (GenEval: the 5-digit folder ``"00000"``; DPG: the prompt file's stem).
    ``origin``: where it came from, for messages (``file:line`` or the file path).
    ``metadata``: GenEval only, the JSON line verbatim (without its line break).
    """

    key: str
    prompt: str
    origin: str
    metadata: str = ""


# ------------------------------------------------------------------------------ reading prompts

def read_geneval_metadata(path: str | Path) -> list[BenchmarkPrompt]:
    """A GenEval-style metadata JSONL -> one item per non-blank line, keys ``00000``, ``00001``, ...

    Raises FileNotFoundError for a missing file, BenchmarkFormatError naming ``file:line`` for a
    line that is not JSON, not an object, or has no non-empty string ``prompt``, and for a file
    without any line.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GenEval metadata file {p} does not exist (GenEval ships "
                                f"prompts/evaluation_metadata.jsonl)")
    items: list[BenchmarkPrompt] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            where = f"{p}:{lineno}"
            try:
                meta = json.loads(text)
            except json.JSONDecodeError as e:
                raise BenchmarkFormatError(f"{where}: not a JSON line ({e.msg} at column {e.colno})") from None
            if not isinstance(meta, dict):
                raise BenchmarkFormatError(f"{where}: expected a JSON object, got {type(meta).__name__}")
            prompt = meta.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise BenchmarkFormatError(f"{where}: no 'prompt' (a non-empty string) in {text[:80]!r}")
            items.append(BenchmarkPrompt(f"{len(items):05d}", prompt, where, text))
    if not items:
        raise BenchmarkFormatError(f"GenEval metadata file {p} has no JSON lines")
    return items


def read_dpg_prompts(folder: str | Path) -> list[BenchmarkPrompt]:
    """DPG-Bench prompt files (``<id>.txt``, one prompt each) -> items keyed by id, sorted by file name.

    ``folder`` is ELLA's ``dpg_bench/prompts`` (or ``dpg_bench``, whose ``prompts/`` is then used).
    Raises FileNotFoundError for a missing folder and BenchmarkFormatError for a folder without
    ``.txt`` files, an empty prompt file, or a file name with a second ``.`` (the scorer keys
    images by the name before the first ``.``, so such an item could never be scored).
    """
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"DPG-Bench prompts folder {d} does not exist or is not a folder "
                                f"(ELLA ships dpg_bench/prompts/)")
    files = sorted(f for f in d.glob("*.txt") if f.is_file())
    if not files and (d / "prompts").is_dir():
        d = d / "prompts"
        files = sorted(f for f in d.glob("*.txt") if f.is_file())
    if not files:
        raise BenchmarkFormatError(f"DPG-Bench prompts folder {d} has no .txt prompt files")
    items = []
    for f in files:
        if "." in f.stem or not f.stem:
            raise BenchmarkFormatError(f"{f}: DPG-Bench's scorer takes the item id as the file name before the "
                                       f"first '.', which would be {f.name.split('.')[0]!r}, not {f.stem!r}; "
                                       f"rename the prompt file")
        text = f.read_text(encoding="utf-8").strip()
        if not text:
            raise BenchmarkFormatError(f"{f}: empty prompt file")
        items.append(BenchmarkPrompt(f.stem, text, str(f)))
    return items


def read_prompts(kind: str, path: str | Path) -> list[BenchmarkPrompt]:
    """`read_geneval_metadata` or `read_dpg_prompts` by ``kind`` ("geneval" | "dpg")."""
    if kind == "geneval":
        return read_geneval_metadata(path)
    if kind == "dpg":
        return read_dpg_prompts(path)
    raise ValueError(f"unknown benchmark {kind!r}; use one of {KINDS}")


# ------------------------------------------------------------------------------ images

def tile(images: np.ndarray, cols: int) -> np.ndarray:
    """uint8 (n, H, W, 3) -> (ceil(n/cols)*H, cols*W, 3), row-major, no padding (a blank white tail)."""
    n, h, w, c = images.shape
    rows = math.ceil(n / cols)
    out = np.full((rows * h, cols * w, c), 255, np.uint8)
    for k, im in enumerate(images):
        r, q = divmod(k, cols)
        out[r * h:(r + 1) * h, q * w:(q + 1) * w] = im
    return out


def _save_png(image: np.ndarray, path: Path) -> Path:
    """Write a PNG atomically (temporary ``.partial-`` name in the same folder, then rename)."""
    from PIL import Image

    tmp = path.with_name(_PARTIAL + path.name)
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, from its header."""
    from arr_jax.data.images import image_size

    return image_size(path)


def noise_seed(seed: int, prompt: str, k: int) -> int:
    """The noise seed of sample ``k`` of ``prompt`` in a run with ``seed``: 31 bits of sha256, so
    equal for the same (seed, prompt, k) in every benchmark, batch and resumed run."""
    digest = hashlib.sha256(f"{seed}\x00{k}\x00{prompt}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# ------------------------------------------------------------------------------ layouts

class GenEvalLayout:
    """``<outdir>/<key>/{metadata.jsonl, grid.png, samples/<k:04d>.png}`` (module docstring)."""

    kind = "geneval"

    def __init__(self, outdir: str | Path, n_samples: int = GENEVAL_SAMPLES, grid: bool = True):
        if n_samples < 1:
            raise ValueError(f"GenEval needs at least one sample per prompt, got {n_samples}")
        self.outdir, self.n_samples, self.grid = Path(outdir), int(n_samples), bool(grid)

    def sample_path(self, item: BenchmarkPrompt, k: int) -> Path:
        return self.outdir / item.key / "samples" / f"{k:04d}.png"

    def clean(self) -> None:
        """Remove temporary files a killed run left behind."""
        for pattern in (f"*/{_PARTIAL}*", f"*/samples/{_PARTIAL}*"):
            for f in self.outdir.glob(pattern):
                f.unlink()

    def is_complete(self, item: BenchmarkPrompt) -> bool:
        """Metadata and all N samples present. Raises BenchmarkFormatError when the folder's
        metadata is another prompt's (a different metadata file was written into ``outdir``)."""
        meta = self.outdir / item.key / "metadata.jsonl"
        if not meta.is_file():
            return False
        have = meta.read_text(encoding="utf-8").strip()
        if have != item.metadata:
            try:
                same = json.loads(have) == json.loads(item.metadata)
            except json.JSONDecodeError:
                same = False
            if not same:
                raise BenchmarkFormatError(f"{meta} holds {have[:80]!r}, not the metadata of {item.origin} "
                                           f"({item.metadata[:80]!r}); write this metadata file into a fresh outdir")
        return all(self.sample_path(item, k).is_file() for k in range(self.n_samples))

    def write(self, item: BenchmarkPrompt, images: np.ndarray) -> list[Path]:
        """Write one prompt's uint8 (N, H, W, 3) samples, the grid, then its metadata; returns the paths."""
        folder = self.outdir / item.key
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        written = [_save_png(im, self.sample_path(item, k)) for k, im in enumerate(images)]
        if self.grid:
            written.append(_save_png(tile(images, math.ceil(math.sqrt(len(images)))), folder / "grid.png"))
        meta = folder / "metadata.jsonl"
        tmp = meta.with_name(_PARTIAL + meta.name)
        tmp.write_text(item.metadata + "\n", encoding="utf-8")
        os.replace(tmp, meta)
        return written + [meta]

    def score_hint(self) -> str:
        return (f"score with GenEval: python evaluation/evaluate_images.py {self.outdir} "
                f"--outfile results.jsonl --model-path <OBJECT_DETECTOR_FOLDER>; "
                f"python evaluation/summary_scores.py results.jsonl")


class DPGLayout:
    """``<outdir>/<key>.png``: a 2x2 grid of 4 R x R samples (module docstring)."""

    kind = "dpg"
    n_samples = DPG_SAMPLES

    def __init__(self, outdir: str | Path, resolution: int):
        if resolution < 1:
            raise ValueError(f"DPG-Bench needs the sample resolution R (the scorer's --resolution), got {resolution}")
        self.outdir, self.resolution = Path(outdir), int(resolution)

    def path(self, item: BenchmarkPrompt) -> Path:
        return self.outdir / f"{item.key}.png"

    def clean(self) -> None:
        for f in self.outdir.glob(f"{_PARTIAL}*"):
            f.unlink()

    def is_complete(self, item: BenchmarkPrompt) -> bool:
        """The grid exists. Raises BenchmarkFormatError when it has another size than (2R, 2R)."""
        p = self.path(item)
        if not p.is_file():
            return False
        size = _png_size(p)
        if size != (2 * self.resolution,) * 2:
            raise BenchmarkFormatError(f"{p} is {size[0]}x{size[1]}, not the {2 * self.resolution}x"
                                       f"{2 * self.resolution} grid of {self.resolution}x{self.resolution} "
                                       f"samples; write into a fresh outdir (or delete it)")
        return True

    def write(self, item: BenchmarkPrompt, images: np.ndarray) -> list[Path]:
        """Tile uint8 (4, R, R, 3) samples row-major into (2R, 2R, 3) and write ``<key>.png``."""
        n, h, w, _ = images.shape
        if n != self.n_samples or (h, w) != (self.resolution,) * 2:
            raise ValueError(f"DPG-Bench grid of {item.origin}: got {n} samples of {h}x{w}, "
                             f"need {self.n_samples} of {self.resolution}x{self.resolution}")
        return [_save_png(tile(images, 2), self.path(item))]

    def score_hint(self) -> str:
        return f"score with DPG-Bench (ELLA): bash dpg_bench/dist_eval.sh {self.outdir} {self.resolution}"


def make_layout(kind: str, outdir: str | Path, *, n_samples: int = GENEVAL_SAMPLES, grid: bool = True,
                resolution: int = 0):
    """The layout writer of ``kind``: GenEval (``n_samples``, ``grid``) or DPG (``resolution`` R)."""
    if kind == "geneval":
        return GenEvalLayout(outdir, n_samples, grid)
    if kind == "dpg":
        if n_samples != DPG_SAMPLES:
            raise ValueError(f"DPG-Bench's layout is a 2x2 grid of {DPG_SAMPLES} samples, got n_samples={n_samples}")
        return DPGLayout(outdir, resolution)
    raise ValueError(f"unknown benchmark {kind!r}; use one of {KINDS}")


# ------------------------------------------------------------------------------ the writer

@dataclasses.dataclass
class BenchmarkRun:
    """What `write_benchmark` did: prompts in total, skipped as complete, and the files written."""

    total: int
    skipped: int
    written: list[Path]


def write_benchmark(layout, items: Sequence[BenchmarkPrompt], sample_fn: SampleFn, *, batch_size: int,
                    seed: int = 0, progress: bool = True) -> BenchmarkRun:
    """Sample every incomplete item's N images and write them in ``layout``.

    ``sample_fn(prompts, seeds)`` gets exactly ``batch_size`` prompts per call (a short last batch is
    padded by repeating its last entry, and the extra images are dropped) with their `noise_seed`s,
    and returns uint8 (batch_size, H, W, 3). The progress bar counts prompts. Raises ValueError
    when ``sample_fn`` returns another shape or dtype.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from tqdm.auto import tqdm

    layout.outdir.mkdir(parents=True, exist_ok=True)
    layout.clean()
    todo = [it for it in items if not layout.is_complete(it)]
    n = layout.n_samples
    jobs = [(i, it, k) for i, it in enumerate(todo) for k in range(n)]
    pending: dict[int, list] = {}
    written: list[Path] = []
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=layout.kind, unit="prompt",
               dynamic_ncols=True, disable=not progress)
    for lo in range(0, len(jobs), batch_size):
        batch = jobs[lo:lo + batch_size]
        padded = batch + [batch[-1]] * (batch_size - len(batch))
        images = np.asarray(sample_fn([it.prompt for _, it, _ in padded],
                                      [noise_seed(seed, it.prompt, k) for _, it, k in padded]))
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != batch_size or images.shape[-1] != 3:
            raise ValueError(f"sample_fn returned {images.dtype} {images.shape}; need uint8 "
                             f"({batch_size}, H, W, 3)")
        for (i, it, k), im in zip(batch, images):
            slots = pending.setdefault(i, [None] * n)
            slots[k] = im
            if all(s is not None for s in slots):
                written += layout.write(it, np.stack(slots))
                del pending[i]
                bar.update(1)
    bar.close()
    return BenchmarkRun(total=len(items), skipped=len(items) - len(todo), written=written)
