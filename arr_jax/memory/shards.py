"""The shared arithmetic of the memory plan: topologies, mesh shapes and per-device parameter bytes.

A parameter's bytes per device follow its logical axes through the sharding rules on an abstract
mesh, exactly as `arr_jax.sharding.param_shardings` places it (an axis whose mesh size does not
divide the dimension replicates it). Models enter as ``[(shape, itemsize, axes, count), ...]``
lists (`entries`) taken from ``nnx.eval_shape`` of our real classes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Topology:
    """``devices`` accelerators of ``hbm_bytes`` memory each; ``name`` is the printed description."""

    name: str
    devices: int
    hbm_bytes: float


TOPOLOGIES = {
    "v5p-8": Topology("TPU v5p-8 (4 chips)", 4, 95 * GB),
    "v5p-32": Topology("TPU v5p-32 (16 chips)", 16, 95 * GB),
    "v6e-8": Topology("TPU v6e-8 (8 chips)", 8, 32 * GB),
    "v6e-16": Topology("TPU v6e-16 (16 chips)", 16, 32 * GB),
    "8xH100-80GB": Topology("8x H100 80GB", 8, 80 * GB),
    "8xH200": Topology("8x H200 141GB", 8, 141 * GB),
}


def parse_topologies(spec: str) -> dict[str, Topology]:
    """``"v5p-8,v6e-8"`` (names from `TOPOLOGIES`) or custom ``"name=devices:hbm_gb"`` entries.

    Raises ValueError naming an unknown topology.
    """
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if "=" in item:
            name, rest = item.split("=", 1)
            n, hbm = rest.split(":")
            out[name] = Topology(name, int(n), float(hbm) * GB)
        elif item in TOPOLOGIES:
            out[item] = TOPOLOGIES[item]
        else:
            raise ValueError(f"unknown topology {item!r}; known: {sorted(TOPOLOGIES)} or name=devices:hbm_gb")
    return out


def rule_sets(devices: int, tensor: int = 2) -> dict[str, dict[str, int]]:
    """Mesh shapes of the two rule sets: FSDP over all devices, and FSDP x tensor parallel."""
    sets = {"fsdp": {"data": 1, "fsdp": devices, "tensor": 1}}
    if tensor > 1 and devices % tensor == 0 and devices > tensor:
        sets[f"fsdp+tp{tensor}"] = {"data": 1, "fsdp": devices // tensor, "tensor": tensor}
    return sets


def dtype_size(x) -> int:
    """Bytes per element of a dtype."""
    return int(np.dtype(x).itemsize)


def shard_bytes(shape: Sequence[int], itemsize: int, axes, rules, mesh_shape: dict[str, int]) -> int:
    """Bytes one device holds of a parameter with logical ``axes`` under ``rules`` on a mesh."""
    n = int(math.prod(shape)) * itemsize
    if axes is None or len(axes) != len(shape):
        return n
    spec = rules.spec(axes)
    for dim, ax in zip(shape, spec):
        if ax is None:
            continue
        size = int(math.prod(mesh_shape[a] for a in ((ax,) if isinstance(ax, str) else ax)))
        if dim % size == 0:
            n //= size
    return n


def per_device(entries: list[tuple], rules, mesh_shape: dict[str, int]) -> int:
    """Bytes per device of a model given as `entries`."""
    return sum(shard_bytes(sh, it, ax, rules, mesh_shape) * c for sh, it, ax, c in entries)


def entries(model, filt, repeat=None) -> list[tuple]:
    """``[(shape, itemsize, logical axes, count), ...]`` of the variables of ``model`` under ``filt``;
    ``repeat`` maps a top-level attribute to how many times its (single traced) block occurs."""
    from flax import nnx

    out = []
    for path, v in nnx.to_flat_state(nnx.state(model, filt)):
        val = v.get_value()
        count = 1
        if repeat is not None and path[0] in repeat:
            count = repeat[path[0]]
        out.append((tuple(val.shape), dtype_size(val.dtype), v.get_metadata().get("axes"), count))
    return out
