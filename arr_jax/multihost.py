"""One process per host: the rows a process owns, process-local host data <-> global arrays, and
reductions of host-side metrics. Single-process runs take the same code paths (every row is local).

Convention: a batch axis sharded over the mesh's batch axes (``("data", "fsdp")``) is split into
contiguous row blocks, one per device; the rows of a process are those its devices hold
(`local_rows`). Host data of a process is always in ascending row order.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding


def is_main() -> bool:
    """Process 0: the one that writes files shared by all processes (metrics, pictures, LoRA files)."""
    return jax.process_index() == 0


def local_rows(sharding: Sharding, shape: tuple[int, ...], axis: int = 0) -> np.ndarray:
    """Indices along ``axis`` of a ``shape`` array with ``sharding`` held by this process's devices
    (ascending, unique)."""
    rows: set[int] = set()
    for idx in sharding.addressable_devices_indices_map(tuple(shape)).values():
        sl = idx[axis] if idx else slice(None)
        rows.update(range(*sl.indices(shape[axis])))
    return np.asarray(sorted(rows), np.int64)


def to_host_local(x: jax.Array, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, data)``: this process's rows of a (possibly multi-process) sharded array, gathered from
    its addressable shards in ascending row order (no cross-host traffic)."""
    if x.is_fully_addressable:
        return np.arange(x.shape[axis]), np.asarray(jax.device_get(x))
    pieces: dict[int, np.ndarray] = {}
    for shard in x.addressable_shards:
        sl = shard.index[axis] if shard.index else slice(None)
        start, stop, _ = sl.indices(x.shape[axis])
        data = np.asarray(shard.data)
        for k, r in enumerate(range(start, stop)):
            pieces.setdefault(r, np.take(data, k, axis=axis))
    rows = np.asarray(sorted(pieces), np.int64)
    return rows, np.stack([pieces[r] for r in rows], axis=axis)


def from_host_local(local: np.ndarray, sharding: Sharding, global_shape: tuple[int, ...]) -> jax.Array:
    """A global array from this process's rows (ascending order, as `local_rows` gives them)."""
    local = np.asarray(local)
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))


def all_gather(x: np.ndarray) -> np.ndarray:
    """Concatenate every process's ``x`` (same shape on each) along a new leading axis (P, ...)."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x))


def sum_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Sum of each numeric value over processes (keys must be the same on every process)."""
    if jax.process_count() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    total = all_gather(np.asarray([values[k] for k in keys], np.float64)).sum(0)
    return {k: float(v) for k, v in zip(keys, total)}


def union_keys(keys) -> list[str]:
    """The sorted union of string keys over processes (e.g. judge failure kinds seen anywhere)."""
    keys = sorted(set(keys))
    if jax.process_count() == 1:
        return keys
    blob = np.frombuffer("\n".join(keys).encode().ljust(4096, b"\0")[:4096], np.uint8)
    out: set[str] = set()
    for row in all_gather(blob):
        text = bytes(row).rstrip(b"\0").decode()
        out.update(k for k in text.split("\n") if k)
    return sorted(out)


def host_tree(tree: Any) -> Any:
    """Every leaf as a full numpy array on this host; all processes must call it together (it gathers
    arrays that span other processes' devices)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
                        if isinstance(x, jax.Array) and not x.is_fully_addressable else np.asarray(x), tree)
