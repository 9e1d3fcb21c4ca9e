"""Streaming safetensors reading and validated loading into NNX models.

We parse the safetensors format ourselves (an 8-byte header length, a JSON header,
raw little-endian bytes) over ``mmap``, so bf16/fp8 tensors load without torch and
only one tensor at a time is materialised on the host.

Loading contract (shared by every model's converter):
  * our NNX module tree mirrors the Hugging Face names, so each converter only supplies
    ``key_map(hf_key) -> (our_path, transform) | None`` (``None`` = deliberately ignored);
  * every HF key must map to an existing parameter with the expected shape, every
    parameter must be filled exactly once; anything else is a `CheckpointFormatError`
    that names the offending keys;
  * each tensor is cast to the parameter's dtype and placed straight onto its
    (possibly sharded) devices.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}

Path_ = tuple[str | int, ...]
KeyMap = Callable[[str], "tuple[Path_, Callable[[np.ndarray], np.ndarray] | None] | None"]


class CheckpointFormatError(ValueError):
    """A weight file does not match the model it is loaded into."""


class _File:
    """One ``.safetensors`` file, memory-mapped; tensors are read lazily."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointFormatError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointFormatError(f"{path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self.data_start = 8 + n
        self._mm = None

    def _map(self):
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def get(self, key: str) -> np.ndarray:
        e = self.entries[key]
        if e["dtype"] not in _DTYPES:
            raise CheckpointFormatError(f"{self.path}: tensor {key!r} has unsupported dtype {e['dtype']}")
        dtype = np.dtype(_DTYPES[e["dtype"]])
        lo, hi = e["data_offsets"]
        mm = self._map()
        if self.data_start + hi > len(mm):
            raise CheckpointFormatError(f"{self.path}: tensor {key!r} lies past the end of the file (truncated?)")
        arr = np.frombuffer(mm, dtype=dtype, count=(hi - lo) // dtype.itemsize, offset=self.data_start + lo)
        return arr.reshape(e["shape"]).copy()


class SafetensorsCheckpoint:
    """All tensors of a directory (``*.safetensors``, optionally with an ``*.index.json``) or one file."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no weights at {path}: the directory or file does not exist")
        if path.is_file():
            files = [path]
        else:
            # Prefer the full-precision index over variants such as ``*.fp16.safetensors.index.json``.
            indices = sorted(path.glob("*.safetensors.index.json"), key=lambda p: (p.name.count("."), p.name))
            if indices:
                with open(indices[0]) as f:
                    weight_map = json.load(f)["weight_map"]
                names = sorted(set(weight_map.values()))
                missing = [n for n in names if not (path / n).exists()]
                if missing:
                    raise FileNotFoundError(f"{indices[0]} lists shard files that are missing: {missing}")
                files = [path / n for n in names]
            else:
                files = sorted(path.glob("*.safetensors"))
                plain = [f for f in files if f.name.count(".") == 1]  # skip *.fp16.safetensors variants
                files = plain or files
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in {path}")
        self.files = [_File(p) for p in files]
        self._where: dict[str, _File] = {}
        for f in self.files:
            for k in f.entries:
                self._where[k] = f

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key].entries[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(_DTYPES[self._where[key].entries[key]["dtype"]])

    def get(self, key: str) -> np.ndarray:
        if key not in self._where:
            raise KeyError(f"tensor {key!r} not in checkpoint")
        return self._where[key].get(key)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for k in self.keys():
            yield k, self.get(k)


def _path_str(path: Path_) -> str:
    return ".".join(str(p) for p in path)


def _stacked_target(path: Path_, targets: dict) -> tuple[str | None, int | None]:
    """``(stacked parameter name, row)`` for a per-block path such as ``transformer_blocks.3.attn.to_q.kernel``
    when the model stores that group stacked (``transformer_blocks.block.attn.to_q.kernel``), else (None, None)."""
    from arr_jax.nn.stack import STACK

    for p, part in enumerate(path):
        if isinstance(part, int):
            name = _path_str(tuple(path[:p]) + (STACK,) + tuple(path[p + 1:]))
            if name in targets:
                return name, part
            return None, None
    return None, None


def flat_params(state: Any) -> dict[str, Any]:
    """``{"a.b.0.kernel": leaf}`` for every leaf of an nnx State / pytree (leaf = Variable or array)."""
    from flax import nnx

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        out[_path_str(tuple(_key_name(k) for k in path))] = leaf
    return out


def _key_name(k) -> str | int:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def load_into_model(model, checkpoint: SafetensorsCheckpoint, key_map: KeyMap, *,
                    shardings: Any | None = None, strict: bool = True,
                    variable_filter: Any = None) -> dict[str, int]:
    """Fill ``model``'s parameters in place from ``checkpoint``.

    Args:
      model: an NNX module (possibly created under ``nnx.eval_shape``: its leaves are then
        ShapeDtypeStructs and get replaced by real arrays).
      key_map: ``hf_key -> (our dotted path as a tuple, transform or None)``, or ``None``
        to skip a key on purpose (e.g. buffers we recompute).
      shardings: optional pytree like ``nnx.state(model)`` of ``jax.sharding.Sharding``;
        each tensor is put directly onto its devices (never the whole model on the host).
      strict: error on unused checkpoint keys and on unfilled parameters.
      variable_filter: nnx filter of the variables to fill (default: ``nnx.Param``);
        LoRA parameters are excluded automatically since they are not in base checkpoints.

    Returns counts ``{"loaded": n, "skipped": m}``.
    """
    from flax import nnx

    from arr_jax.nn_filters import base_param_filter

    filt = variable_filter if variable_filter is not None else base_param_filter()
    state = nnx.state(model, filt)
    targets = flat_params(state)
    flat_shard = flat_params(shardings) if shardings is not None else {}
    filled: set[str] = set()
    unused, bad_shape, skipped = [], [], 0
    rows: dict[str, tuple[np.ndarray, set]] = {}  # stacked targets being filled block by block
    for hf_key in checkpoint.keys():
        mapped = key_map(hf_key)
        if mapped is None:
            skipped += 1
            continue
        path, transform = mapped
        name, row = _path_str(path), None
        if name not in targets:  # block i of a stacked group (arr_jax.nn.stack): row i of one parameter
            name, row = _stacked_target(path, targets)
        if name is None:
            unused.append(f"{hf_key} -> {_path_str(path)}")
            continue
        var = targets[name]
        value = var.get_value() if hasattr(var, "get_value") else var
        want = tuple(value.shape) if row is None else tuple(value.shape[1:])
        arr = checkpoint.get(hf_key)
        if transform is not None:
            arr = transform(arr)
        if tuple(arr.shape) != want:
            where = name if row is None else f"{name}[{row}]"
            bad_shape.append(f"{hf_key}: checkpoint {tuple(arr.shape)} vs model {want} ({where})")
            continue
        if row is not None:  # collect the rows on the host; the whole stack goes to its devices at once
            buf, seen = rows.setdefault(name, (np.zeros(value.shape, np.dtype(value.dtype)), set()))
            if row in seen:
                raise CheckpointFormatError(f"two checkpoint keys map to the same parameter {name}[{row}] "
                                            f"(second: {hf_key})")
            buf[row] = arr.astype(buf.dtype)
            seen.add(row)
            if len(seen) < value.shape[0]:
                continue
            arr = buf
            del rows[name]
        if name in filled:
            raise CheckpointFormatError(f"two checkpoint keys map to the same parameter {name} (second: {hf_key})")
        arr = arr.astype(value.dtype)
        sh = flat_shard.get(name)
        new = jax.device_put(arr, sh) if sh is not None else jax.numpy.asarray(arr)
        var.set_value(new)
        filled.add(name)
    for name, (buf, seen) in rows.items():
        absent = sorted(set(range(buf.shape[0])) - seen)
        bad_shape.append(f"{name}: blocks {absent} of its {buf.shape[0]} stacked blocks are not in the checkpoint")
        filled.add(name)
    missing = sorted(set(targets) - filled)
    problems = []
    if bad_shape:
        problems.append("shape mismatch:\n  " + "\n  ".join(bad_shape))
    if strict and unused:
        problems.append("checkpoint keys with no matching parameter:\n  " + "\n  ".join(unused))
    if strict and missing:
        problems.append("parameters missing from the checkpoint:\n  " + "\n  ".join(missing))
    if problems:
        files = ", ".join(str(f.path) for f in checkpoint.files[:3])
        raise CheckpointFormatError(f"weights in {files} do not fit the model:\n" + "\n".join(problems))
    nnx.update(model, state)
    return {"loaded": len(filled), "skipped": skipped}


def weights_path(directory: str | os.PathLike, stem: str) -> Path:
    """``stem.safetensors.index.json`` or ``stem.safetensors`` in ``directory`` (full precision,
    ignoring ``*.fp16.*`` variants beside them); the directory itself if neither exists."""
    directory = Path(directory)
    index, single = directory / f"{stem}.safetensors.index.json", directory / f"{stem}.safetensors"
    if index.exists():
        return directory
    return single if single.exists() else directory


def load_abstract(build: Callable[[], Any], checkpoint: SafetensorsCheckpoint, key_map: KeyMap, rules=None):
    """Build a model abstractly (``nnx.eval_shape(build)``: no host copy of the weights) and fill it
    from ``checkpoint``, each tensor placed on its shards when ``rules`` has a mesh."""
    from flax import nnx

    from arr_jax.sharding import param_shardings

    model = nnx.eval_shape(build)
    shardings = None
    if rules is not None and rules.mesh is not None:
        shardings = param_shardings(nnx.state(model, nnx.Param), rules)
    load_into_model(model, checkpoint, key_map, shardings=shardings)
    return model
