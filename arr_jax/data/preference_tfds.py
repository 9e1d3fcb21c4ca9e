"""Preference pairs: the local JSONL format, a reader, and a tfds builder (array_record, no TF).

Local format: a JSONL file (``.jsonl``), one pair per line (a ``.json`` file holding an array of
the same objects is read too: the format comes from the extension; UTF-8 with or without BOM);
image paths are relative to the file's folder (or absolute)::

    {"id": "hpd-000017",                 # optional (default: "<file stem>-<line number / position>")
     "prompt": "a red bicycle",          # the prompt, or the editing instruction
     "image1": "images/000017_a.jpg",    # the two candidates, in the order to judge ("fwd")
     "image2": "images/000017_b.jpg",
     "label": 1,                         # the preferred image: 1 or 2 ("A"/"B" also accepted)
     "source": "images/000017_src.jpg",  # optional: the source image of an editing pair
     "category": "counting",             # optional: for per-category accuracy
     "meta": {...}}                      # optional: anything else, kept as JSON

`arr_jax.data.converters` writes this format from published benchmark layouts.

``JsonlPairs(path)`` reads it directly (images decoded on access by
`arr_jax.data.images.to_rgb_uint8`: transparency on white, 16-bit / float scaled).
``build_preference(data_dir, name, {"train": a.jsonl, "test": b.jsonl})`` packs it into tfds
array_record files (original image bytes kept when they already decode to those RGB pixels, else
their RGB PNG); ``load_preference(data_dir, config, split)`` returns a random-access sequence of
`PreferencePair` over the built split. Editing pairs and T2I pairs may share a file:
``has_source`` tells them apart (T2I pairs store a 1x1 placeholder).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from arr_jax.data.images import rgb_encoded, to_rgb_uint8
from arr_jax.data.json_records import load_records


@dataclasses.dataclass(eq=False)
class PreferencePair:
    """One labelled pair. Images are uint8 (H, W, 3); ``label`` is the preferred image (1 or 2)."""

    id: str
    prompt: str
    image1: np.ndarray
    image2: np.ndarray
    label: int
    source: np.ndarray | None = None
    category: str = ""
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.label not in (1, 2):
            raise ValueError(f"pair {self.id}: label must be 1 or 2, got {self.label!r}")

    @property
    def preferred(self) -> np.ndarray:
        return self.image1 if self.label == 1 else self.image2

    @property
    def rejected(self) -> np.ndarray:
        return self.image2 if self.label == 1 else self.image1


def parse_label(v: Any) -> int:
    """1 / 2 from 1, 2, "1", "2", "A", "B", "image1", "image2"; ValueError otherwise."""
    if isinstance(v, bool):
        raise ValueError(f"bad preference label {v!r}")
    s = str(v).strip().lower().replace(" ", "").replace("_", "")
    table = {"1": 1, "2": 2, "a": 1, "b": 2, "image1": 1, "image2": 2, "left": 1, "right": 2}
    if s not in table:
        raise ValueError(f"bad preference label {v!r}; expected 1/2 or A/B")
    return table[s]


def read_image(path: str | os.PathLike | bytes) -> np.ndarray:
    """An image file (or encoded bytes) as uint8 (H, W, 3) RGB, by `arr_jax.data.images.to_rgb_uint8`
    (transparency on white, 16-bit / float scaled); `ImageDecodeError` (a ValueError) naming the file."""
    return to_rgb_uint8(path)


def rgb_bytes(path: str | os.PathLike) -> bytes:
    """Encoded bytes of an image file that decode to `read_image`'s pixels: the file as is when a
    plain decode already gives them (see `arr_jax.data.images.rgb_encoded`), else an RGB PNG."""
    return rgb_encoded(Path(path).read_bytes(), name=f"file {os.fspath(path)}")[0]


def read_records(path: str | os.PathLike) -> list[dict]:
    """Validated records of a pairs file, image paths made absolute. ``.jsonl``: one pair per line
    (the documented format); ``.json``: an array of pairs (`arr_jax.data.json_records`: format
    from the extension, UTF-8 with or without BOM). Errors name the file and line (or record)."""
    path = Path(path)
    root = path.parent
    out, seen = [], set()
    for r in load_records(path):
        d, where = r.data, r.where
        for k in ("prompt", "image1", "image2", "label"):
            if k not in d:
                raise ValueError(f"{where}: missing field {k!r}")
        try:
            label = parse_label(d["label"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        rec = {"id": str(d.get("id", f"{path.stem}-{r.number}")), "prompt": str(d["prompt"]), "label": label,
               "category": str(d.get("category", "") or ""), "meta": d.get("meta", {}) or {}}
        if rec["id"] in seen:
            raise ValueError(f"{where}: duplicate id {rec['id']!r}")
        seen.add(rec["id"])
        for k in ("image1", "image2", "source"):
            if d.get(k):
                p = Path(d[k])
                p = p if p.is_absolute() else root / p
                if not p.exists():
                    raise FileNotFoundError(f"{where}: {k} file {p} does not exist")
                rec[k] = str(p)
            else:
                rec[k] = None
        out.append(rec)
    return out


class JsonlPairs(Sequence):
    """Random-access PreferencePairs straight from a pairs file (JSONL, or a JSON array; images read on access)."""

    def __init__(self, path: str | os.PathLike, limit: int | None = None):
        self.path = Path(path)
        self.records = read_records(self.path)[:limit]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.records]

    def _pair(self, r: dict) -> PreferencePair:
        return PreferencePair(id=r["id"], prompt=r["prompt"], image1=read_image(r["image1"]),
                              image2=read_image(r["image2"]), label=r["label"],
                              source=read_image(r["source"]) if r["source"] else None,
                              category=r["category"], meta=dict(r["meta"]))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._pair(r) for r in self.records[i]]
        return self._pair(self.records[i])


# --------------------------------------------------------------------------------------------
# tfds builder


@dataclasses.dataclass(eq=False)
class PreferenceConfig(tfds.core.BuilderConfig):
    """``splits``: ((split name, absolute JSONL path), ...). Build one with `preference_config`."""

    splits: tuple = ()


class PreferencePairs(tfds.core.GeneratorBasedBuilder):
    """Labelled image preference pairs (T2I or editing) from the local JSONL format."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [PreferenceConfig(name="default", description="(built from a config)")]

    # The data is generated here, never downloaded: keep tfds's "Downloading and preparing dataset"
    # lines (printed unconditionally) out of an offline run's output.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _info(self) -> tfds.core.DatasetInfo:
        image = lambda: tfds.features.Image(shape=(None, None, 3))  # noqa: E731
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(), "prompt": tfds.features.Text(),
                "image1": image(), "image2": image(), "source": image(),
                "has_source": tfds.features.Scalar(np.bool_),
                "label": tfds.features.Scalar(np.int32),
                "category": tfds.features.Text(), "meta": tfds.features.Text(),
            }),
            supervised_keys=None, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {name: self._generate_examples(path) for name, path in self.builder_config.splits}

    def _generate_examples(self, path):
        for i, r in enumerate(read_records(path)):
            yield i, {"id": r["id"], "prompt": r["prompt"],
                      "image1": rgb_bytes(r["image1"]), "image2": rgb_bytes(r["image2"]),
                      "source": rgb_bytes(r["source"]) if r["source"] else _PLACEHOLDER,
                      "has_source": r["source"] is not None, "label": r["label"],
                      "category": r["category"], "meta": json.dumps(r["meta"], sort_keys=True)}


def _placeholder() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    return buf.getvalue()


_PLACEHOLDER = _placeholder()


def preference_config(name: str, splits: Mapping[str, str | os.PathLike]):
    """A config named ``<name>_<digest of the JSONL contents>`` (new data -> a new config)."""
    h = hashlib.sha1()
    items = []
    for split, p in sorted(splits.items()):
        p = Path(p).resolve()
        h.update(split.encode() + b"\0" + p.read_bytes() + b"\0")
        items.append((split, str(p)))
    return PreferenceConfig(name=f"{name}_{h.hexdigest()[:10]}", description=f"splits: {dict(items)}",
                   splits=tuple(items))


def build_preference(data_dir: str | os.PathLike, name: str, splits: Mapping[str, str | os.PathLike]):
    """Build (unless built) the tfds dataset for ``splits`` {split: JSONL}; returns the builder."""
    builder = PreferencePairs(data_dir=os.fspath(data_dir), config=preference_config(name, splits),
                  file_format="array_record")
    if not builder.is_prepared():
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS, try_download_gcs=False))
    return builder


class TfdsPairs(Sequence):
    """Random-access PreferencePairs over a tfds data source."""

    def __init__(self, source, limit: int | None = None):
        self.source = source
        self.n = len(source) if limit is None else min(limit, len(source))

    def __len__(self) -> int:
        return self.n

    @property
    def ids(self) -> list[str]:
        txt = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)  # noqa: E731
        return [txt(self.source[i]["id"]) for i in range(self.n)]

    @staticmethod
    def _pair(r: dict) -> PreferencePair:
        txt = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)  # noqa: E731
        return PreferencePair(id=txt(r["id"]), prompt=txt(r["prompt"]), image1=np.asarray(r["image1"]),
                              image2=np.asarray(r["image2"]), label=int(r["label"]),
                              source=np.asarray(r["source"]) if bool(r["has_source"]) else None,
                              category=txt(r["category"]), meta=json.loads(txt(r["meta"]) or "{}"))

    def __getitem__(self, i):
        if isinstance(i, slice):
            idx = list(range(*i.indices(self.n)))
            return [self._pair(r) for r in self.source.__getitems__(idx)] if idx else []
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self._pair(self.source[i % self.n])


def load_preference(data_dir: str | os.PathLike, config: str, split: str, limit: int | None = None) -> TfdsPairs:
    """PreferencePairs of a built split; ``config`` is the built config's name (see the
    builder's ``builder_config.name``) or its folder under ``data_dir/preference_pairs``."""
    root = Path(data_dir) / PreferencePairs.name / config
    versions = sorted(d for d in root.iterdir() if (d / "dataset_info.json").exists()) if root.is_dir() else []
    if not versions:
        raise FileNotFoundError(f"preference config {config!r} is not built under {data_dir}; "
                                "run build_preference first")
    builder = tfds.builder_from_directory(os.fspath(versions[-1]))
    return TfdsPairs(builder.as_data_source(split=split), limit)
