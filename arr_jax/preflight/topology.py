"""Named TPU topologies as libtpu lays them out, and their devices on a CPU-only machine.

JAX compiles ahead of time for a TPU slice it does not have: ``jax.experimental.topologies.get_topology_desc``
with libtpu installed returns the slice's devices (`tpu_devices`), a mesh is built from them as on the
pod, and ``jax.jit(f).lower(...).compile()`` runs libtpu's compiler for it (maxtext's ``train_compile.py``
does the same). Names follow Cloud TPU's accelerator types (``v5p-8`` = 4 chips of 2 TensorCores,
counted as 8; ``v6e-8`` = 8 chips); a libtpu layout string such as ``v6e:4x4`` is accepted too.
Each device's HBM is the chip's (`arr_jax.perf.CHIPS`) divided by the devices per chip.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os

# name -> libtpu layout. v5p / v4 layouts count chips in 3-D (2 TensorCores per chip act as one device),
# v5e / v6e in 2-D (one TensorCore per chip). The Colab TPU runtimes are v2-8, v5e-1 and v6e-1.
TOPOLOGIES = {
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4",
    "v5p-128": "v5p:4x4x4",
    "v6e-1": "v6e:1x1", "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4", "v6e-32": "v6e:4x8",
    "v6e-64": "v6e:8x8", "v6e-256": "v6e:16x16",
    "v5e-1": "v5e:1x1", "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4",
    "v4-8": "v4:2x2x1", "v4-32": "v4:2x2x4",
    "v2-8": "v2:2x2",
}
COLAB = ("v2-8", "v5e-1", "v6e-1")
INSTALL = 'pip install -e ".[tpu]"'


class TopologyError(ValueError):
    """A topology that cannot be used here: unknown name, no libtpu, a mesh that does not divide it.
    The message is one line saying what to do."""


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice: ``name`` as given, libtpu ``layout``, its ``devices``, the chip's peaks."""

    name: str
    layout: str
    devices: tuple
    device_kind: str
    chips: int
    hbm_bytes_per_device: float
    peak_flops_per_device: float
    hbm_bytes_per_s_per_device: float

    @property
    def num_devices(self) -> int:
        return len(self.devices)


def layout_of(name: str) -> str:
    """The libtpu layout of a topology name (``v6e-8`` -> ``v6e:2x4``); a layout passes through."""
    if name in TOPOLOGIES:
        return TOPOLOGIES[name]
    if ":" in name:
        return name
    raise TopologyError(f"unknown topology {name!r}: use one of {', '.join(TOPOLOGIES)} or a libtpu layout such "
                        "as v6e:4x4")


def tpu_slice(name: str) -> Slice:
    """The devices of TPU topology ``name`` on this (CPU-only) machine, through libtpu's compiler.

    Raises `TopologyError` (one line) when libtpu is not installed or the name is unknown.
    """
    layout = layout_of(name)
    if importlib.util.find_spec("libtpu") is None:
        raise TopologyError(f"compiling for {name} needs libtpu, which is not installed: {INSTALL}")
    # Compiling only: several processes (a test beside a run) may each load libtpu here.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    from arr_jax.perf import chip_spec

    dims = [int(d) for d in layout.split(":", 1)[1].split("x")]
    chips = math.prod(dims)
    kw = {"chips_per_host_bounds": (1, 1, 1)} if chips == 1 else {}
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=layout, **kw)
    except Exception as e:  # libtpu's message for a bad layout is long and internal
        raise TopologyError(f"libtpu does not know the layout {layout!r} ({name}): "
                            f"{str(e).splitlines()[0][:160]}") from None
    devices = tuple(desc.devices)
    spec = chip_spec(devices[0].device_kind)
    if spec is None:
        raise TopologyError(f"no peak figures for device kind {devices[0].device_kind!r} ({name}) in arr_jax.perf.CHIPS")
    per_chip = max(len(devices) // chips, 1)
    return Slice(name=name, layout=layout, devices=devices, device_kind=devices[0].device_kind, chips=chips,
                 hbm_bytes_per_device=spec.hbm_bytes / per_chip, peak_flops_per_device=spec.peak_bf16_flops / per_chip,
                 hbm_bytes_per_s_per_device=spec.hbm_bytes_per_s / per_chip)
