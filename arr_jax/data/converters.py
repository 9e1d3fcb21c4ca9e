"""Converters from published preference benchmarks to the local pairs JSONL format
(`arr_jax.data.preference_tfds`). Each reads the layout as downloaded from the Hugging Face Hub
and writes ``<out_dir>/pairs.jsonl`` (+ ``images/`` where images must be extracted).

Layouts (from the datasets' public loaders; check yours if a converter complains):

HPDv3 (``MizzenAI/HPDv3``, e.g. ``test.json``): a JSON list (or JSONL) of
  {"prompt", "path1", "path2", "model1", "model2", "confidence", "choice_dist", ...} where
  ``path1`` is the PREFERRED image, paths relative to the file's folder. Written in the
  dataset's order, so label = 1 always (fwd = preferred first, as the paper's protocol reads
  it). category: the item's "category" if any, else "".

MMRB2 (``facebookresearch/MMRB2`` ``benchmark/t2i.json`` / ``edit.json`` after its build
  script): {"pairs": [{"id", "prompt_content": [["image", path] ..., ["text", str]],
  "response_a": {"model_name", "response_content": [["image", path]]}, "response_b": ...,
  "chosen": "A" | "B", "prompt_source", "prompt_metadata", "human_annotations"}]}; paths
  relative to the JSON's folder. ("human_preference" is accepted for "chosen".) Image A is
  image1. category: "prompt_source". Editing pairs use their one input image as the source;
  pairs with several input images are skipped (``multi_source="skip"``) or keep the first.

EditReward-Bench (``TIGER-Lab/EditReward-Bench``): parquet shards (or a JSONL export) with
  "id", "instruction", "source_image", "candidate_1", "candidate_2" (images as
  {"bytes", "path"} structs, raw bytes, or file paths), "ranking" ("A>B" | "B>A" | "A=B"),
  "dataset" ("2pair" | "3pair" | "4pair"), "model_1", "model_2", "comparison_type". The
  paper's EditReward-Bench (K=2) column is the "2pair" subset (``subset``). Ties ("A=B") are
  skipped: the judges here may not answer a tie. category: "comparison_type" (else
  "dataset").

Input files: the format comes from the extension, ``.json`` (one document) or ``.jsonl`` (one
record per line; a file of one line is one record), read as ``utf-8-sig``, with the container type
checked (`arr_jax.data.json_records.load_records`); errors name the file and line. Extracted
images are kept as they are when they already decode to plain RGB, else written as the RGB PNG of
`arr_jax.data.images.to_rgb_uint8` (transparency on white, 16-bit scaled).

Every converter returns a `ConversionReport` with the skip counts by reason.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

from arr_jax.data.images import rgb_encoded
from arr_jax.data.json_records import load_records


@dataclasses.dataclass
class ConversionReport:
    path: Path
    written: int
    skipped: dict[str, int]

    def __str__(self) -> str:
        return f"{self.written} pairs -> {self.path}; skipped {self.skipped or 'none'}"


def _write(out_dir: Path, rows: Iterable[dict], skipped: Counter, limit: int | None) -> ConversionReport:
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / "pairs.jsonl"
    n = 0
    tmp = dst.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            if limit is not None and n >= limit:
                break
            f.write(json.dumps(r) + "\n")
            n += 1
    os.replace(tmp, dst)
    return ConversionReport(dst, n, dict(skipped))


def _abs(root: Path, p: str) -> str:
    q = Path(p)
    return str(q if q.is_absolute() else (root / q).resolve())


def convert_hpdv3(json_path: str | os.PathLike, out_dir: str | os.PathLike, limit: int | None = None,
                  check_files: bool = True) -> ConversionReport:
    """HPDv3 test/train JSON -> pairs.jsonl (image paths made absolute; images not copied)."""
    src = Path(json_path)
    items = [r.data for r in load_records(src)]
    skipped: Counter = Counter()

    def rows():
        for i, it in enumerate(items):
            if not all(k in it for k in ("prompt", "path1", "path2")):
                skipped["missing_field"] += 1
                continue
            p1, p2 = _abs(src.parent, it["path1"]), _abs(src.parent, it["path2"])
            if check_files and not (Path(p1).exists() and Path(p2).exists()):
                skipped["missing_image"] += 1
                continue
            meta = {k: it[k] for k in ("model1", "model2", "confidence", "choice_dist") if k in it}
            yield {"id": str(it.get("id", f"hpdv3-{i:06d}")), "prompt": it["prompt"], "image1": p1, "image2": p2,
                   "label": 1, "category": str(it.get("category", "") or ""), "meta": meta}

    return _write(Path(out_dir), rows(), skipped, limit)


def _first(content: Sequence, kind: str) -> list[str]:
    return [c[1] for c in content or [] if isinstance(c, (list, tuple)) and len(c) == 2 and c[0] == kind]


def convert_mmrb2(json_path: str | os.PathLike, out_dir: str | os.PathLike, task: str = "t2i",
                  multi_source: str = "skip", limit: int | None = None, check_files: bool = True) -> ConversionReport:
    """MMRB2 ``t2i.json`` (task "t2i") or ``edit.json`` (task "edit") -> pairs.jsonl."""
    if task not in ("t2i", "edit") or multi_source not in ("skip", "first"):
        raise ValueError(f"task must be 't2i' or 'edit' and multi_source 'skip' or 'first'; got {task!r}, "
                         f"{multi_source!r}")
    src = Path(json_path)
    pairs = [r.data for r in load_records(src, key="pairs")]
    skipped: Counter = Counter()

    def rows():
        for i, it in enumerate(pairs):
            choice = str(it.get("chosen", it.get("human_preference", ""))).strip().upper()
            if choice not in ("A", "B"):
                skipped[f"label_{choice or 'missing'}"] += 1
                continue
            texts = _first(it.get("prompt_content"), "text")
            inputs = _first(it.get("prompt_content"), "image")
            ra = _first((it.get("response_a") or {}).get("response_content"), "image")
            rb = _first((it.get("response_b") or {}).get("response_content"), "image")
            if not texts or not ra or not rb:
                skipped["missing_text_or_image"] += 1
                continue
            row = {"id": str(it.get("id", it.get("pair_id", f"mmrb2-{task}-{i:06d}"))), "prompt": "\n".join(texts),
                   "image1": _abs(src.parent, ra[0]), "image2": _abs(src.parent, rb[0]),
                   "label": 1 if choice == "A" else 2, "category": str(it.get("prompt_source", "") or ""),
                   "meta": {"models": [(it.get(k) or {}).get("model_name", (it.get(k) or {}).get("model"))
                                       for k in ("response_a", "response_b")],
                            "human_annotations": it.get("human_annotations")}}
            if task == "edit":
                if not inputs:
                    skipped["edit_without_source"] += 1
                    continue
                if len(inputs) > 1 and multi_source == "skip":
                    skipped["multiple_source_images"] += 1
                    continue
                row["source"] = _abs(src.parent, inputs[0])
            elif inputs:
                skipped["t2i_with_input_image"] += 1
                continue
            if check_files and not all(Path(row[k]).exists() for k in ("image1", "image2", "source") if k in row):
                skipped["missing_image"] += 1
                continue
            yield row

    return _write(Path(out_dir), rows(), skipped, limit)


def _image_bytes(v: Any, root: Path) -> bytes | None:
    if v is None:
        return None
    if isinstance(v, dict):
        if v.get("bytes"):
            return bytes(v["bytes"])
        return _image_bytes(v.get("path"), root) if v.get("path") else None
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    if isinstance(v, str):
        p = Path(v) if Path(v).is_absolute() else root / v
        return p.read_bytes() if p.exists() else None
    return None


def _save_image(data: bytes, stem: Path, name: str) -> str:
    """Write an embedded image as ``stem.<ext>``: the original bytes when they already decode to the
    RGB pixels of `arr_jax.data.images.to_rgb_uint8`, else an RGB PNG of those pixels."""
    out, ext = rgb_encoded(data, name=name)
    path = stem.with_suffix("." + ext)
    path.write_bytes(out)
    return str(path)


def _editreward_rows(paths: Sequence[Path]) -> Iterable[tuple[dict, Path, str]]:
    """(row, folder for relative image paths, where the row is for messages) over the files."""
    for p in paths:
        if p.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ImportError("reading parquet needs pyarrow (pip install pyarrow), or export the "
                                  "dataset to JSONL first") from None
            n = 0
            for batch in pq.ParquetFile(p).iter_batches(batch_size=64):
                for row in batch.to_pylist():
                    yield row, p.parent, f"{p}: row {n}"
                    n += 1
        else:
            for r in load_records(p):
                yield r.data, p.parent, r.where


def convert_editreward_bench(paths: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                             subset: str | None = "2pair", limit: int | None = None) -> ConversionReport:
    """EditReward-Bench parquet shards / JSONL (a file, a list, or a folder searched for
    ``*.parquet`` / ``*.jsonl``) -> pairs.jsonl + images/ (the embedded images extracted)."""
    if isinstance(paths, (str, os.PathLike)):
        p = Path(paths)
        paths = sorted(list(p.rglob("*.parquet")) + list(p.rglob("*.jsonl"))) if p.is_dir() else [p]
    paths = [Path(p) for p in paths]
    if not paths:
        raise FileNotFoundError("no EditReward-Bench parquet / jsonl files given")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    skipped: Counter = Counter()
    rank = {"A>B": 1, "B>A": 2}
    seen: set[str] = set()

    def rows():
        for i, (r, root, where) in enumerate(_editreward_rows(paths)):
            if subset and r.get("dataset") not in (None, subset):
                skipped[f"subset_{r.get('dataset')}"] += 1
                continue
            ranking = str(r.get("ranking", "")).replace(" ", "")
            if ranking not in rank:
                skipped["tie" if ranking == "A=B" else f"ranking_{ranking or 'missing'}"] += 1
                continue
            imgs = [_image_bytes(r.get(k), root) for k in ("source_image", "candidate_1", "candidate_2")]
            if any(b is None for b in imgs):
                skipped["missing_image"] += 1
                continue
            rid = str(r.get("id", f"editreward-{i:06d}")).replace("/", "_")
            stem = out / "images" / f"{i:06d}_{rid}"[:120]
            files = [_save_image(b, stem.with_name(stem.name + suf), f"{where}: {k}")
                     for b, suf, k in zip(imgs, ("_src", "_1", "_2"), ("source_image", "candidate_1", "candidate_2"))]
            uid = rid if rid not in seen else f"{rid}-{i}"  # one sample can yield several pairs
            seen.add(uid)
            yield {"id": uid, "prompt": str(r.get("instruction", "")),
                   "source": files[0], "image1": files[1], "image2": files[2], "label": rank[ranking],
                   "category": str(r.get("comparison_type") or r.get("dataset") or ""),
                   "meta": {k: r.get(k) for k in ("model_1", "model_2", "score_1", "score_2", "dataset")
                            if r.get(k) is not None}}

    return _write(out, rows(), skipped, limit)
