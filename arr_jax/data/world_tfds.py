"""tensorflow-datasets builder for the synthetic world (array_record, no TensorFlow).

Splits:
  train    ``n_train`` scenes of the train prompts (spec.TRAIN_PROMPTS), uniform over them
  heldout  ``n_heldout`` scenes of the held-out prompts (spec.HELDOUT_PROMPTS)

Each example (as returned by the data source; Text comes back as bytes):
  image          uint8 (S, S, 3), stored PNG-encoded
  prompt         bytes, the true caption, e.g. b"two red circles on the left"
  caption        bytes, the corrupted pretraining caption (spec.corrupt)
  prompt_id      int32, index into spec.ALL_PROMPTS
  attrs          int32 (4,), true (colour, shape, count, position), see Prompt.to_ints
  caption_attrs  int32 (4,), what the caption says; -1 where the attribute was omitted

Generation is seeded and deterministic; examples are stored in generation order
(``disable_shuffling``), so record i of a split is always the same scene. The corruption
probabilities are part of the config (and of its name), so different settings live side by
side under ``data_dir/world/<config name>/``.

Use ``build_world(data_dir, ...)`` to build (if missing) and ``load_world(data_dir, split)``
to get a random-access data source (``len(src)``, ``src[i]``, ``src.__getitems__(idxs)``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import time
from typing import Mapping

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from arr_jax.world import render, spec

_CHUNK = 512  # scenes rendered per vectorised batch (and per RNG stream)
_SPLIT_CODES = {"train": 1, "heldout": 2}


@dataclasses.dataclass(eq=False)
class WorldConfig(tfds.core.BuilderConfig):
    """World dataset config. Build one with ``world_config(...)`` so the name encodes the
    parameters. p_wrong_*: per-attribute probability that the caption states a wrong value;
    p_drop_*: probability that it omits the attribute (disjoint from wrong)."""

    n_train: int = 20000
    n_heldout: int = 2000
    image_size: int = 32
    seed: int = 0
    p_wrong_colour: float = 0.0
    p_wrong_shape: float = 0.0
    p_wrong_count: float = 0.0
    p_wrong_position: float = 0.0
    p_drop_colour: float = 0.0
    p_drop_shape: float = 0.0
    p_drop_count: float = 0.0
    p_drop_position: float = 0.0

    @property
    def p_wrong(self) -> dict[str, float]:
        return {a: getattr(self, f"p_wrong_{a}") for a in spec.ATTRIBUTES}

    @property
    def p_drop(self) -> dict[str, float]:
        return {a: getattr(self, f"p_drop_{a}") for a in spec.ATTRIBUTES}


_PARAMS = tuple(f.name for f in dataclasses.fields(WorldConfig)
                if f.name not in {g.name for g in dataclasses.fields(tfds.core.BuilderConfig)})


def _per_attr(x: Mapping[str, float] | float | None) -> dict[str, float]:
    if x is None:
        return {a: 0.0 for a in spec.ATTRIBUTES}
    if isinstance(x, (int, float)):
        return {a: float(x) for a in spec.ATTRIBUTES}
    bad = set(x) - set(spec.ATTRIBUTES)
    if bad:
        raise ValueError(f"unknown attributes {sorted(bad)}; expected {spec.ATTRIBUTES}")
    return {a: float(x.get(a, 0.0)) for a in spec.ATTRIBUTES}


def world_config(
    n_train: int = 20000,
    n_heldout: int = 2000,
    p_wrong: Mapping[str, float] | float | None = None,
    p_drop: Mapping[str, float] | float | None = None,
    image_size: int = 32,
    seed: int = 0,
) -> WorldConfig:
    """A WorldConfig whose name is a digest of its parameters (e.g. "n20000_h2000_3f9a...")."""
    pw, pd = _per_attr(p_wrong), _per_attr(p_drop)
    for a in spec.ATTRIBUTES:
        if not (0 <= pw[a] and 0 <= pd[a] and pw[a] + pd[a] <= 1):
            raise ValueError(f"bad corruption probabilities for {a}: wrong={pw[a]} drop={pd[a]}")
    kw = dict(n_train=int(n_train), n_heldout=int(n_heldout), image_size=int(image_size),
              seed=int(seed))
    kw.update({f"p_wrong_{a}": pw[a] for a in spec.ATTRIBUTES})
    kw.update({f"p_drop_{a}": pd[a] for a in spec.ATTRIBUTES})
    digest = hashlib.sha1(repr(sorted(kw.items())).encode()).hexdigest()[:10]
    desc = ", ".join(f"{k}={v}" for k, v in kw.items())
    return WorldConfig(name=f"n{n_train}_h{n_heldout}_s{image_size}_{digest}",
                       description=desc, **kw)


DEFAULT_CONFIG = world_config()


class World(tfds.core.GeneratorBasedBuilder):
    """The synthetic world: 1-3 identical coloured shapes in one half of a black canvas."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [DEFAULT_CONFIG]

    # The data is generated here, never downloaded: keep tfds's "Downloading and preparing dataset"
    # lines (printed unconditionally) out of an offline run's output.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                "prompt": tfds.features.Text(),
                "caption": tfds.features.Text(),
                "prompt_id": tfds.features.Scalar(np.int32),
                "attrs": tfds.features.Tensor(shape=(4,), dtype=np.int32),
                "caption_attrs": tfds.features.Tensor(shape=(4,), dtype=np.int32),
            }),
            supervised_keys=None,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.n_train, spec.TRAIN_PROMPTS),
            "heldout": self._generate_examples("heldout", cfg.n_heldout, spec.HELDOUT_PROMPTS),
        }

    def _generate_examples(self, split: str, n: int, prompts):
        cfg = self.builder_config
        t0 = time.time()
        for start in range(0, n, _CHUNK):
            rng = np.random.default_rng([cfg.seed, _SPLIT_CODES[split], start // _CHUNK])
            m = min(_CHUNK, n - start)
            ids = rng.integers(len(prompts), size=m)
            scenes = [prompts[i] for i in ids]
            images = render.render_batch(scenes, rng, cfg.image_size)
            for j, sc in enumerate(scenes):
                cap = spec.corrupt_prompt(sc, rng, cfg.p_wrong, cfg.p_drop)
                buf = io.BytesIO()
                Image.fromarray(images[j]).save(buf, format="PNG")
                yield start + j, {
                    "image": buf.getvalue(),
                    "prompt": sc.text,
                    "caption": cap.text,
                    "prompt_id": spec.prompt_id(sc),
                    "attrs": sc.to_ints(),
                    "caption_attrs": cap.to_ints(),
                }
            done = start + m
            if _VERBOSE and (done == n or (done // _CHUNK) % 10 == 0):
                print(f"[world] {split}: {done}/{n} examples ({time.time() - t0:.1f}s)",
                      flush=True)


_VERBOSE = True


def _builder(data_dir: str | os.PathLike, config: WorldConfig | str | None) -> World:
    return World(data_dir=os.fspath(data_dir), config=config or DEFAULT_CONFIG,
                 file_format="array_record")


def build_world(
    data_dir: str | os.PathLike,
    n_train: int = 20000,
    n_heldout: int = 2000,
    p_wrong: Mapping[str, float] | float | None = None,
    p_drop: Mapping[str, float] | float | None = None,
    image_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> World:
    """Build the world dataset under ``data_dir`` unless already built; returns the builder.

    p_wrong / p_drop: per-attribute dict (keys in spec.ATTRIBUTES) or one float for all.
    ``progress`` prints a line every ~5k examples (tfds may show its own bars too).
    """
    global _VERBOSE
    cfg = world_config(n_train, n_heldout, p_wrong, p_drop, image_size, seed)
    builder = _builder(data_dir, cfg)
    if builder.is_prepared():
        return builder
    _VERBOSE = progress
    t0 = time.time()
    if progress:
        print(f"[world] building {cfg.name} in {builder.data_dir}", flush=True)
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
                try_download_gcs=False))
    finally:
        _VERBOSE = True
    if progress:
        print(f"[world] built {n_train}+{n_heldout} examples in {time.time() - t0:.1f}s",
              flush=True)
    return builder


def load_world(
    data_dir: str | os.PathLike,
    split: str,
    config: WorldConfig | str | None = None,
):
    """Random-access data source of a built split ("train" or "heldout").

    config: a WorldConfig (as from ``world_config``), a config name, or None: the only
    config built under ``data_dir`` (the default config if none or several are built).
    Raises FileNotFoundError if that config has not been built (see ``build_world``).
    """
    if split not in _SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(_SPLIT_CODES)}")
    if config is None:
        root = os.path.join(os.fspath(data_dir), World.name)
        built = sorted(d for d in (os.listdir(root) if os.path.isdir(root) else [])
                       if os.path.exists(os.path.join(root, d, str(World.VERSION),
                                                      "dataset_info.json")))
        config = built[0] if len(built) == 1 else DEFAULT_CONFIG
    if isinstance(config, str):
        builder = tfds.builder_from_directory(
            os.path.join(os.fspath(data_dir), World.name, config, str(World.VERSION)))
    else:
        builder = _builder(data_dir, config)
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"world config {config.name} not built under {data_dir}; call build_world")
    return builder.as_data_source(split=split)


def to_arrays(source, indices=None, batch_size: int = 1024) -> dict[str, np.ndarray]:
    """Read records of a data source into stacked numpy arrays.

    Returns image uint8 (N,S,S,3), prompt / caption object arrays of str, prompt_id int32
    (N,), attrs / caption_attrs int32 (N, 4).
    """
    idx = np.arange(len(source)) if indices is None else np.asarray(indices)
    cols: dict[str, list] = {}
    for s in range(0, len(idx), batch_size):
        recs = source.__getitems__([int(i) for i in idx[s:s + batch_size]])
        for r in recs:
            for k, v in r.items():
                cols.setdefault(k, []).append(v)
    if not cols:
        return {}
    out = {}
    for k, v in cols.items():
        if k in ("prompt", "caption"):
            out[k] = np.array([x.decode("utf-8") if isinstance(x, bytes) else str(x)
                               for x in v], dtype=object)
        elif k == "image":
            out[k] = np.stack(v).astype(np.uint8)
        else:
            out[k] = np.asarray(v, np.int32)
    return out
