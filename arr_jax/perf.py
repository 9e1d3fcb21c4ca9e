"""Cost and speed of jitted programs: FLOPs, bytes, compile time, achieved TFLOP/s and MFU.

    from arr_jax import perf

    cost = perf.program_cost(jitted_fn, *args)      # AOT: .lower(*args).compile(), timed
    cost.flops          # model FLOPs (matmuls + convolutions), loop trip counts included
    cost.xla_flops      # XLA's cost_analysis() "flops" (every loop body counted ONCE)
    cost.bytes_accessed # XLA's "bytes accessed" (loop bodies counted once as well)
    cost.compile_s      # seconds in .compile() (and cost.lower_s in .lower())
    perf.mfu(cost.flops, seconds)                   # fraction of the chip's peak bf16 FLOP/s, None on CPU
    perf.achieved(cost, seconds)                    # {"tflop_s", "mfu", "gb_s", "hbm_util"}

    step = perf.Instrumented(trainer.programs.train_step, "update")   # same calling convention
    step(*args)          # first call per input signature compiles through AOT and records its cost
    step.last            # ProgramCost of the most recent call's signature; step.calls, step.compile_s

Two FLOP counts, and why. XLA's ``cost_analysis()`` (jax 0.10 returns a dict, jax 0.11 may return a
list with one dict per computation; `xla_cost` accepts both) counts the body of a ``while`` loop once,
whatever its trip count: the RPO rollout (a ``lax.scan`` over T steps) and update (a scan over
micro-batches x trained steps) would be under-counted T-fold. `jaxpr_flops` therefore counts the
FLOPs of every ``dot_general`` and convolution in the program's jaxpr, multiplying ``scan`` bodies by
their length and taking the costliest branch of a ``cond``; a ``while_loop`` with no static trip count
is counted once and reported in ``unknown_loops``. Elementwise work is left out, as MFU conventions
do. Rematerialised forwards (``jax.checkpoint``) are in the jaxpr and so in the count: with remat
the figure is hardware FLOPs, slightly above the model FLOPs of the same step.

FLOPs are global (the whole logical program); on a mesh of ``n`` chips pass ``num_devices=n`` to
`mfu`. XLA's numbers are for one device's partition of an SPMD program.

Peak numbers (`CHIPS`) are the vendors' dense bf16 matrix rates and HBM bandwidths; CPUs have none,
and `mfu` then returns None.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np


# ---------------------------------------------------------------------------- chips

@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Peak dense bf16 matrix FLOP/s and HBM bytes/s of one chip (one GPU, one TPU chip)."""

    name: str
    peak_bf16_flops: float
    hbm_bytes_per_s: float
    hbm_bytes: float


# device_kind substrings (lower case), most specific first. Sources: Google Cloud TPU system
# architecture pages (v5p: 459 TFLOP/s, 2765 GB/s, 95 GB; v6e: 918 TFLOP/s, 1640 GB/s, 32 GB) and
# NVIDIA's H100/H200 SXM datasheets (989 TFLOP/s dense bf16; 3.35 TB/s 80 GB / 4.8 TB/s 141 GB).
CHIPS: dict[str, ChipSpec] = {
    "h200": ChipSpec("NVIDIA H200", 989e12, 4.8e12, 141e9),
    "h100 pcie": ChipSpec("NVIDIA H100 PCIe", 756e12, 2.0e12, 80e9),
    "h100": ChipSpec("NVIDIA H100 SXM", 989e12, 3.35e12, 80e9),
    "v6 lite": ChipSpec("TPU v6e", 918e12, 1.64e12, 32e9),
    "v6e": ChipSpec("TPU v6e", 918e12, 1.64e12, 32e9),
    "v5p": ChipSpec("TPU v5p", 459e12, 2.765e12, 95e9),
    "v5 lite": ChipSpec("TPU v5e", 197e12, 0.819e12, 16e9),
    "v5e": ChipSpec("TPU v5e", 197e12, 0.819e12, 16e9),
    "tpu v5": ChipSpec("TPU v5p", 459e12, 2.765e12, 95e9),  # v5p reports device_kind "TPU v5"
    "v4": ChipSpec("TPU v4", 275e12, 1.228e12, 32e9),
    "tpu v2": ChipSpec("TPU v2", 45e12, 0.6e12, 16e9),  # the Colab v2-8 runtime (2 TensorCores a chip)
}


def chip_spec(device: Any = None) -> ChipSpec | None:
    """The `ChipSpec` of ``device`` (default ``jax.devices()[0]``), or None (CPU, unknown chip).

    ``device`` may be a jax Device or a ``device_kind`` string such as ``"NVIDIA H200"``.
    """
    if device is None:
        device = jax.devices()[0]
    kind = device if isinstance(device, str) else getattr(device, "device_kind", "")
    if not isinstance(device, str) and getattr(device, "platform", "") == "cpu":
        return None
    kind = kind.lower()
    for key, spec in CHIPS.items():
        if key in kind:
            return spec
    return None


def mfu(flops: float, seconds: float, device: Any = None, *, num_devices: int = 1,
        peak_flops: float | None = None) -> float | None:
    """Model FLOPs utilisation: ``flops / seconds / (peak * num_devices)``, a fraction in [0, 1].

    ``flops`` are the program's total (e.g. `ProgramCost.flops` times the calls timed); ``peak``
    is ``peak_flops`` if given, else the chip's from `CHIPS`. Returns None when no peak is known
    (CPU) or ``seconds`` is not positive.
    """
    if peak_flops is None:
        spec = chip_spec(device)
        peak_flops = None if spec is None else spec.peak_bf16_flops
    if not peak_flops or not seconds or seconds <= 0 or flops is None or not math.isfinite(flops):
        return None
    return float(flops) / float(seconds) / (peak_flops * num_devices)


def hbm_utilisation(bytes_accessed: float, seconds: float, device: Any = None, *,
                    num_devices: int = 1) -> float | None:
    """``bytes / seconds / (HBM bandwidth * num_devices)``; None when unknown (CPU)."""
    spec = chip_spec(device)
    if spec is None or not seconds or seconds <= 0 or bytes_accessed is None or not math.isfinite(bytes_accessed):
        return None
    return float(bytes_accessed) / float(seconds) / (spec.hbm_bytes_per_s * num_devices)


# ---------------------------------------------------------------------------- counting

@dataclasses.dataclass
class ProgramCost:
    """What one compiled program costs per call.

    flops:          matmul + convolution FLOPs from the jaxpr, scan lengths included (`jaxpr_flops`).
    unknown_loops:  while loops without a static trip count, counted once in ``flops``.
    xla_flops:      XLA cost_analysis "flops" (loop bodies once; NaN when unavailable).
    bytes_accessed: XLA cost_analysis "bytes accessed" (loop bodies once; NaN when unavailable).
    transcendentals: XLA cost_analysis "transcendentals".
    lower_s, compile_s: seconds in ``.lower()`` and ``.compile()`` (0 when not compiled here).
    """

    flops: float
    unknown_loops: int = 0
    xla_flops: float = math.nan
    bytes_accessed: float = math.nan
    transcendentals: float = math.nan
    lower_s: float = 0.0
    compile_s: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def xla_cost(compiled) -> dict[str, float]:
    """``compiled.cost_analysis()`` as one dict of floats, on jax 0.10 (a dict) and 0.11 (a list of
    per-computation dicts, summed). Empty when the backend gives nothing."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # some backends / versions raise instead of returning nothing
        return {}
    if ca is None:
        return {}
    parts = ca if isinstance(ca, (list, tuple)) else [ca]
    out: dict[str, float] = {}
    for part in parts:
        for k, v in (part or {}).items():
            try:
                out[k] = out.get(k, 0.0) + float(v)
            except (TypeError, ValueError):
                continue
    return out


def _prod(xs) -> int:
    return int(math.prod(int(x) for x in xs))


def _dot_flops(eqn) -> float:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (_, rc), (_, rb) = eqn.params["dimension_numbers"]
    free_rhs = [d for i, d in enumerate(rhs) if i not in set(rc) | set(rb)]
    return 2.0 * _prod(lhs) * _prod(free_rhs)


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    dn = eqn.params["dimension_numbers"]
    out_ch = rhs[dn.rhs_spec[0]] if dn is not None else rhs[0]
    return 2.0 * _prod(out) * _prod(rhs) / max(int(out_ch), 1)


def _attention_flops(eqn) -> float:
    """cuDNN fused attention primitives: q (B, S, H, D), k (B, T, H, D); forward 4BHSTD, backward 2.5x."""
    q, k = (v.aval.shape for v in eqn.invars[:2])
    b, s, h, d = q
    fwd = 4.0 * b * h * s * k[1] * d
    return 2.5 * fwd if "bwd" in eqn.primitive.name else fwd


def _sub_jaxprs(params: dict):
    for v in params.values():
        for j in (v if isinstance(v, (list, tuple)) else [v]):
            if hasattr(j, "eqns"):
                yield j
            elif hasattr(j, "jaxpr") and hasattr(j.jaxpr, "eqns"):
                yield j.jaxpr


def _count(jaxpr) -> tuple[float, int]:
    flops, unknown = 0.0, 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            flops += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            flops += _conv_flops(eqn)
        elif "dot_product_attention" in name:
            flops += _attention_flops(eqn)
        elif name == "scan":
            f, u = _count(eqn.params["jaxpr"].jaxpr)
            flops, unknown = flops + f * int(eqn.params["length"]), unknown + u
        elif name == "cond":
            counts = [_count(b.jaxpr) for b in eqn.params["branches"]]
            flops += max(c[0] for c in counts)
            unknown += max(c[1] for c in counts)
        elif name == "while":
            f, u = _count(eqn.params["body_jaxpr"].jaxpr)
            flops, unknown = flops + f, unknown + u + 1
        else:
            for sub in _sub_jaxprs(eqn.params):
                f, u = _count(sub)
                flops, unknown = flops + f, unknown + u
    return flops, unknown


def jaxpr_flops(fn: Callable, *args, **kwargs) -> tuple[float, int]:
    """``(flops, unknown_loops)`` of ``fn(*args, **kwargs)``: matmul and convolution FLOPs of its jaxpr.

    ``fn`` is a jitted function (its ``.trace`` is used) or any traceable function. ``scan``
    bodies count ``length`` times, a ``cond`` counts its costliest branch, a ``while`` body counts
    once (and adds 1 to ``unknown_loops``). Arguments may be arrays or ``jax.ShapeDtypeStruct``.
    """
    if hasattr(fn, "trace"):
        closed = fn.trace(*args, **kwargs).jaxpr
    else:
        closed = jax.make_jaxpr(fn)(*args, **kwargs)
    return _count(closed.jaxpr)


def aot_compile(jitted: Callable, *args, **kwargs):
    """``(compiled, ProgramCost)``: ``jitted.lower(*args, **kwargs).compile()`` timed, with its costs.

    The returned ``compiled`` is called with the dynamic arguments (static ones left out) and keeps
    the jitted function's donation. Raises what ``lower``/``compile`` raise (e.g. a shape error).
    """
    flops, unknown = jaxpr_flops(jitted, *args, **kwargs)
    t0 = time.perf_counter()
    lowered = jitted.lower(*args, **kwargs)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    ca = xla_cost(compiled)
    cost = ProgramCost(flops=flops, unknown_loops=unknown, xla_flops=ca.get("flops", math.nan),
                       bytes_accessed=ca.get("bytes accessed", math.nan),
                       transcendentals=ca.get("transcendentals", math.nan), lower_s=t1 - t0, compile_s=t2 - t1)
    return compiled, cost


def program_cost(jitted: Callable, *args, **kwargs) -> ProgramCost:
    """The `ProgramCost` of ``jitted`` at these arguments (compiles it through AOT; see `aot_compile`)."""
    return aot_compile(jitted, *args, **kwargs)[1]


def achieved(cost: ProgramCost | float, seconds: float, device: Any = None, *, calls: int = 1,
             num_devices: int = 1) -> dict[str, float | None]:
    """Achieved rates of ``calls`` calls of a program that took ``seconds`` in total.

    Returns ``tflop_s`` (from ``cost.flops``), ``mfu`` and, when XLA gave bytes, ``gb_s`` and
    ``hbm_util`` (both from XLA's bytes, so under-counted for loops). ``cost`` may be a FLOP count.
    """
    flops = cost.flops if isinstance(cost, ProgramCost) else float(cost)
    total = flops * calls
    out: dict[str, float | None] = {
        "tflop_s": total / seconds / 1e12 if seconds > 0 else None,
        "mfu": mfu(total, seconds, device, num_devices=num_devices),
    }
    if isinstance(cost, ProgramCost) and math.isfinite(cost.bytes_accessed) and seconds > 0:
        b = cost.bytes_accessed * calls
        out["gb_s"] = b / seconds / 1e9
        out["hbm_util"] = hbm_utilisation(b, seconds, device, num_devices=num_devices)
    return out


# ---------------------------------------------------------------------------- instrumented calls

def _signature(args, kwargs) -> tuple:
    leaves, tree = jax.tree.flatten((args, kwargs))
    sig = []
    for x in leaves:
        if isinstance(x, (jax.Array, np.ndarray)):
            sharding = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
            sig.append((tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)), sharding))
        else:
            sig.append(type(x))
    return tree, tuple(sig)


class Instrumented:
    """A jitted function, compiled through AOT once per input signature, that records its costs.

    Call it as the jitted function (no static arguments). Each new signature (pytree structure,
    shapes, dtypes, shardings) is lowered and compiled by `aot_compile`; every call then runs the
    compiled executable (donation kept). Attributes:

      name       label for reports.
      last       `ProgramCost` of the latest call's signature (None before the first call).
      calls      number of calls; compile_s: total compile + lower seconds over all signatures.
      costs      {signature: ProgramCost}.
      flops_run  sum of ``cost.flops`` over all calls made so far.
    """

    def __init__(self, jitted: Callable, name: str = ""):
        if isinstance(jitted, Instrumented):   # wrapping twice counts from here on, compiles once more
            jitted = jitted.fn
        if not hasattr(jitted, "lower"):
            raise TypeError(f"Instrumented needs a jax.jit-ed function, got {type(jitted).__name__}")
        self.fn, self.name = jitted, name or getattr(jitted, "__name__", "program")
        self.costs: dict[tuple, ProgramCost] = {}
        self._compiled: dict[tuple, Any] = {}
        self.last: ProgramCost | None = None
        self.calls = 0
        self.compile_s = 0.0
        self.flops_run = 0.0

    def __call__(self, *args, **kwargs):
        key = _signature(args, kwargs)
        if key not in self._compiled:
            compiled, cost = aot_compile(self.fn, *args, **kwargs)
            self._compiled[key], self.costs[key] = compiled, cost
            self.compile_s += cost.lower_s + cost.compile_s
        self.last = self.costs[key]
        self.calls += 1
        self.flops_run += self.last.flops
        return self._compiled[key](*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self.fn.lower(*args, **kwargs)

    def trace(self, *args, **kwargs):
        return self.fn.trace(*args, **kwargs)

    def reset(self) -> None:
        """Forget call counts (compiled programs and costs are kept)."""
        self.calls, self.flops_run = 0, 0.0


def device_summary(devices: Sequence[Any] | None = None) -> dict:
    """Platform, device kind and count, and the known peaks (for benchmark JSON)."""
    devices = list(jax.devices() if devices is None else devices)
    spec = chip_spec(devices[0])
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind, "num_devices": len(devices),
            "jax": jax.__version__, "peak_bf16_tflop_s": None if spec is None else spec.peak_bf16_flops / 1e12,
            "hbm_gb_s": None if spec is None else spec.hbm_bytes_per_s / 1e9}
