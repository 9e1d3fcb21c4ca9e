"""Side-by-side timing and reporting shared by the benchmarks: interleaved repeats, medians, a
markdown table, JSON under ``runs/benchmarks/``, and the facts a figure needs (date, machine,
command, commit, load).

Interleaving: with sides ``{"ours": f, "torch": g}`` and ``reps`` repeats, the calls run
``f g f g ...`` after one warm-up call of each, so a load change on a shared machine hits both
sides alike; each side's figure is the median of its repeats.
"""
from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def interleaved(sides: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, dict]:
    """Time each side ``reps`` times, interleaved, after ``warmup`` untimed calls each.

    Returns ``{side: {"median_s", "min_s", "times_s", "warmup_s"}}``; the warm-up time of the first call
    includes compilation (ours) or lazy initialisation (PyTorch).
    """
    out: dict[str, dict] = {name: {"times_s": [], "warmup_s": []} for name in sides}
    for _ in range(warmup):
        for name, fn in sides.items():
            t = time.perf_counter()
            fn()
            out[name]["warmup_s"].append(time.perf_counter() - t)
    for _ in range(reps):
        for name, fn in sides.items():
            t = time.perf_counter()
            fn()
            out[name]["times_s"].append(time.perf_counter() - t)
    for name, r in out.items():
        r["median_s"] = float(np.median(r["times_s"])) if r["times_s"] else float("nan")
        r["min_s"] = float(np.min(r["times_s"])) if r["times_s"] else float("nan")
    return out


class Side:
    """A benchmark side in its own spawned process (no JAX imported there), called method by method.

    ``factory(*args)`` builds the side's object in the child; ``side.call("method", *args)`` runs
    ``obj.method(*args)`` there and returns its (picklable) result; an exception in the child is
    re-raised here as RuntimeError with the child's traceback. Keeping PyTorch out of the JAX process
    keeps either runtime's thread pool (XLA's, PyTorch's OpenMP) out of the other's timed calls; with
    both in one process, PyTorch's CPU update step measured up to ~3x slower than standalone on this
    shared machine (not separated from the machine's load at the time).
    """

    def __init__(self, factory: Callable, *args):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, factory, args), daemon=True)
        self.proc.start()
        self._check(self.conn.recv())

    @staticmethod
    def _check(msg):
        status, value = msg
        if status == "error":
            raise RuntimeError(f"benchmark side failed in its process:\n{value}")
        return value

    def call(self, method: str, *args):
        self.conn.send((method, args))
        return self._check(self.conn.recv())

    def fn(self, method: str, *args) -> Callable[[], object]:
        """A no-argument callable running ``method(*args)`` in the child (for `interleaved`)."""
        return lambda: self.call(method, *args)

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(("__close__", ()))
            self.proc.join(timeout=30)


def _serve(conn, factory, args) -> None:
    try:
        obj = factory(*args)
        conn.send(("ok", None))
    except BaseException:  # report anything, incl. import errors, to the parent
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        method, a = conn.recv()
        if method == "__close__":
            break
        try:
            conn.send(("ok", getattr(obj, method)(*a)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


def load() -> str:
    """The 1/5/15-minute load averages (``os.getloadavg``), e.g. "3.12 2.80 2.51"."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def commit() -> str:
    """``git rev-parse --short HEAD`` of this checkout, with ``+dirty`` when the tree has changes."""
    try:
        h = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                           timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (h or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict:
    """Host facts for a figure: CPU count, platform, Python, accelerator (via `arr_jax.perf`)."""
    from arr_jax.perf import device_summary

    info = {"host": platform.node(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), **device_summary()}
    try:
        from importlib.metadata import version

        info["torch"] = version("torch")  # not imported here: PyTorch runs in its own process (`Side`)
    except Exception:
        pass
    return info


def header(name: str) -> dict:
    """Date, command, commit, machine and load at the start of a benchmark."""
    return {"benchmark": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "commit": commit(), "machine": machine(),
            "load_before": load()}


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or not np.isfinite(a) or not np.isfinite(b) or b == 0:
        return None
    return float(a) / float(b)


def matmul_peak(n: int = 2048, reps: int = 5, dtype: str = "float32") -> dict:
    """The machine's measured dense matmul rate with JAX: best of ``reps`` ``n x n @ n x n`` products
    on the default device (``2 n^3`` FLOPs each). Returns ``{"tflop_s", "n", "dtype", "seconds",
    "load"}``. On a CPU, where no chip peak is tabled, it is the peak the benchmarks' MFU is a
    share of (the issue's "machine's matmul peak"; a loaded machine gives a lower figure)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), getattr(jnp, dtype))
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, a))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(a, a))
        best = min(best, time.perf_counter() - t)
    return {"tflop_s": 2 * n ** 3 / best / 1e12, "n": n, "dtype": dtype, "seconds": best, "load": load()}


def timer_resolution_s() -> float:
    """The smallest interval the benchmarks can time: ``time.perf_counter``'s stated resolution or the
    measured cost of timing an empty call (median of 1000), whichever is larger."""
    stated = time.get_clock_info("perf_counter").resolution
    costs = []
    for _ in range(1000):
        t = time.perf_counter()
        costs.append(time.perf_counter() - t)
    return max(float(stated), float(np.median(costs)))


# a row is resolved when every timed call lasts at least this many timer resolutions (1% error)
MIN_RESOLUTIONS = 100


def resolve(ratio: float | None, ours: list[dict], ref: list[dict],
            resolution_s: float | None = None) -> tuple[str, str]:
    """Whether a speedup ``ratio`` (ours / reference) can be told from the timings it came from.

    ``ours`` and ``ref``: the `interleaved` timings (``times_s`` lists) of each side's calls that the
    row is computed from (several for a derived row, e.g. a decode rate from two generate calls).
    Returns ``(status, shown)``: status ``"ok"`` with the ratio formatted, or, instead of a speedup,

      * ``"missing"``: a side was not measured;
      * ``"one_repeat"``: a side has fewer than 2 timed repeats, so its spread is unknown;
      * ``"below_resolution"``: a timed call is shorter than `MIN_RESOLUTIONS` x the timer's
        resolution (`timer_resolution_s`);
      * ``"noise"``: a side's repeats vary (max / min) by more than the ratio claims
        (``max(ratio, 1/ratio)``), so the same code could show the opposite result in the next run.
    """
    if ratio is None or not ours or not ref or any(not t.get("times_s") for t in ours + ref):
        return "missing", "-"
    times = [np.asarray(t["times_s"], float) for t in ours + ref]
    if min(len(t) for t in times) < 2:
        return "one_repeat", f"not resolved: 1 repeat (ratio {fmt(ratio)})"
    res = timer_resolution_s() if resolution_s is None else resolution_s
    shortest = min(float(t.min()) for t in times)
    if shortest < MIN_RESOLUTIONS * res:
        return "below_resolution", f"not resolved: {shortest:.2g} s calls, timer resolution {res:.2g} s"
    spread = max(float(t.max() / t.min()) if t.min() > 0 else float("inf") for t in times)
    claim = max(ratio, 1 / ratio) if ratio > 0 else float("inf")
    if spread > claim:
        return "noise", f"not resolved: repeats vary x{spread:.2f} > ratio {fmt(ratio)}"
    return "ok", fmt(ratio)


def add_ratio(row: dict, ours_key: str, ref_key: str, ours: list[dict], ref: list[dict], *,
              higher_is_better: bool = True) -> dict:
    """Set ``row["ratio"]`` (ours / reference of the two rates, or reference / ours of two times when
    ``higher_is_better`` is False), ``row["ratio_status"]`` and ``row["ratio_shown"]`` (`resolve`)."""
    r = ratio(row.get(ours_key), row.get(ref_key)) if higher_is_better else ratio(row.get(ref_key), row.get(ours_key))
    row["ratio"] = r
    row["ratio_status"], row["ratio_shown"] = resolve(r, ours, ref)
    return row


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, float) and not np.isfinite(x):
        return "-"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{x:.{digits}g}"


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with ``columns`` = [(header, key), ...]."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k)) for _, k in columns) + " |")
    return "\n".join(lines)


def write(result: dict, out: str | Path) -> Path:
    """Write ``result`` (plus ``load_after``) as JSON to ``out``; refuses paths inside the source tree
    other than ``runs/`` (benchmarks never write into the sources)."""
    result["load_after"] = load()
    out = Path(out)
    resolved = out.resolve()
    if resolved.is_relative_to(ROOT) and not resolved.is_relative_to(ROOT / "runs"):
        raise ValueError(f"benchmark output {out} is inside the source tree; write under runs/ or elsewhere")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    return out


def print_result(title: str, md: str, result: dict) -> None:
    print(f"\n## {title}\n")
    print(f"date {result['date']}  commit {result['commit']}  device {result['machine'].get('device_kind')}"
          f"  cpus {result['machine'].get('cpus')}  load {result['load_before']}")
    print(f"command: {result['command']}\n")
    print(md)
    print()


def summary(directory: str | Path) -> dict:
    """Merge the ``<step>.json`` files of a suite directory into ``suite.json`` and ``suite.md``.

    Each step contributes its header (date, commit, machine, command) and its markdown table; a step
    without JSON (it failed or ran out of time) is listed as missing."""
    d = Path(directory)
    steps = {}
    md = [f"# Benchmark suite ({d.name})", ""]
    for name in ("rollout", "update", "judge", "iteration"):
        f = d / f"{name}.json"
        if not f.exists():
            steps[name] = None
            md += [f"## {name}", "", "missing: no JSON (see suite.log)", ""]
            continue
        r = json.loads(f.read_text())
        steps[name] = r
        m = r.get("machine", {})
        md += [f"## {name}", "", f"{r.get('date')} · commit {r.get('commit')} · {m.get('device_kind')} "
               f"({m.get('platform')}, jax {m.get('jax')}, torch {m.get('torch')}) · `{r.get('command')}` · load "
               f"{r.get('load_before')} → {r.get('load_after')}", "", r.get("markdown_table", ""), ""]
    (d / "suite.json").write_text(json.dumps(steps, indent=2, default=str))
    (d / "suite.md").write_text("\n".join(md))
    return steps


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "summary":
        summary(sys.argv[2])
        print((Path(sys.argv[2]) / "suite.md").read_text())
    else:
        print("usage: python benchmarks/report.py summary DIR", file=sys.stderr)
        sys.exit(2)
