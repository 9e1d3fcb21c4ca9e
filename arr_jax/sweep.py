"""Run a config's sweep: ``get_hyper(h)`` (`arr_jax.hyper`) expanded into one run per point.

    python -m arr_jax.sweep --config configs/demo.py [--config.rpo.iterations=100]
        [--parallel 2] [--dry_run] [--print_commands] [--workdir runs/lr_sweep] [--metric gain]

Every point runs its config's entry point (the config file's module-level ``ENTRY``, default
``arr_jax.train``) as a subprocess::

    python -m <ENTRY> --config <file>[:variant] [base overrides] --config.workdir=<root>/<name> \\
        --config.<key>=<value> ...

``<root>`` is ``<workdir>/sweep`` (``--workdir``, else the config's own ``workdir``) and
``<name>`` the point's values, e.g. ``learning_rate=0.0005,kl_beta=0.01,seed=0`` (the last path
component of each key, the full path where two would clash; characters other than letters,
digits and ``._=,+-`` become ``_``; names over 200 characters are cut and get a hash).

Before anything runs, every point's command line is parsed the way the entry point will parse
it (ml_collections' ``DEFINE_config_file`` with ``lock_config``), after a strict type check: an
unknown key or a value of the wrong type (a float for an int, an int for a bool, a number for a
string) is a ``ValueError`` naming the key, and nothing runs. The config must have a
``workdir`` key.

A point is finished when its workdir holds ``report.json`` or a ``sweep_status.json`` saying
``done`` (written after the subprocess exits 0); finished points are skipped, so an
interrupted sweep resumes. A failed point (nonzero exit) is recorded as ``failed``, reported
with the tail of its log (``<point>/sweep.log``) and retried on the next invocation; the other
points still run, and the sweep exits 1. At the end ``<root>/results.{md,csv}`` tabulate every
point's ``report.json`` numbers (top-level and one level nested, ``parent.child``) and
``<root>/results.png`` plots one metric (`arr_jax.sweep_report`).

``--dry_run`` prints one line per point (workdir and overrides); ``--print_commands`` prints
one ``launch/tpu_pod.sh TPU_NAME ZONE "<command>"`` line per point (``--tpu_name``, ``--zone``).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import hashlib
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from arr_jax import hyper
from arr_jax.atomic import atomic_write_text, read_json

DEFAULT_ENTRY = "arr_jax.train"
STATUS_FILE = "sweep_status.json"
LOG_FILE = "sweep.log"
MAX_NAME = 200


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One run: ``values`` as get_hyper gave them (key without ``config.`` -> value), ``args`` the
    ``--config.<key>=<value>`` strings that set them, ``workdir`` the run's own directory."""
    name: str
    values: dict[str, Any]
    args: tuple[str, ...]
    workdir: str


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """A validated sweep: what runs where. ``root`` holds the points' workdirs and the results."""
    config_arg: str
    entry: str
    base_args: tuple[str, ...]
    root: str
    points: tuple[SweepPoint, ...]
    keys: tuple[str, ...]
    short: dict[str, str]

    def command(self, point: SweepPoint, python: str = "python") -> list[str]:
        """argv of ``point``'s run: ``python -m ENTRY --config FILE[:variant] ... overrides``."""
        return [python, "-m", self.entry, "--config", self.config_arg, *self.base_args,
                f"--config.workdir={point.workdir}", *point.args]


# --- values on the command line ---------------------------------------------------------------

def render_value(value: Any) -> str:
    """The text ml_collections' flag parsers turn back into ``value`` (floats by ``repr``, which
    round-trips exactly; tuples as a Python literal; bools ``True``/``False``; strings as is)."""
    if isinstance(value, (bool, int, str)):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    raise TypeError(f"cannot put {type(value).__name__} value {value!r} on a command line")


def _name_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "_".join(_name_value(v) for v in value) or "empty"
    return render_value(value)


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+\-]", "_", text)


def short_names(keys: list[str]) -> dict[str, str]:
    """Key -> its last path component, or the full path where two keys share that component."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def point_name(values: dict[str, Any], short: dict[str, str]) -> str:
    """``key=value,...`` in ``values`` order, sanitised for file systems; ``default`` if empty."""
    name = _sanitize(",".join(f"{short[k]}={_name_value(v)}" for k, v in values.items())) or "default"
    if len(name) > MAX_NAME:
        name = name[:MAX_NAME - 11] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name


# --- the config and its sweep -----------------------------------------------------------------

def load_config_module(path: str):
    """Import a config file by path (the part of ``--config`` before ``:``)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location(f"sweep_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _leaf_paths(cfg, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        path = f"{prefix}{k}"
        out += _leaf_paths(v, path + ".") if hasattr(v, "items") and not isinstance(v, dict) else [path]
    return out


def _lookup(cfg, key: str, where: str) -> Any:
    node = cfg
    for part in key.split("."):
        if not hasattr(node, "items") or part not in node:
            close = difflib.get_close_matches(key, _leaf_paths(cfg), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"sweep key {key} is not in {where}{hint}")
        node = node[part]
    if hasattr(node, "items"):
        raise ValueError(f"sweep key {key} names a sub-config in {where}; sweep its fields instead")
    return node


def check_value(key: str, value: Any, current: Any, where: str) -> Any:
    """``value`` in the type of the config's ``current`` value (an int for a float becomes a float,
    a list for a tuple a tuple); a mismatch is a ValueError naming ``key``."""
    def bad(what):
        return ValueError(f"sweep key {key}: value {value!r} is {what}, but {where} has "
                          f"{type(current).__name__} {current!r} there")

    if current is None:
        raise ValueError(f"sweep key {key}: {where} has None there, which the command line cannot set")
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise bad(f"a {type(value).__name__}, not a bool")
        return value
    if isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(f"a {type(value).__name__}, not an int")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"a {type(value).__name__}, not a float")
        return float(value)
    if isinstance(current, str):
        if not isinstance(value, str):
            raise bad(f"a {type(value).__name__}, not a str")
        return value
    if isinstance(current, tuple):
        if not isinstance(value, (tuple, list)):
            raise bad(f"a {type(value).__name__}, not a tuple")
        return tuple(value)
    raise bad("of a type the sweep does not set")


def parse_like_entry(config_arg: str, args: list[str]):
    """The ConfigDict an entry point gets from ``--config config_arg *args`` (lock_config=True)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["entry", "--config", config_arg, *args]
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return holder.value


def plan_sweep(config_arg: str, base_overrides: dict[str, Any] | None = None, workdir: str = "") -> SweepPlan:
    """Expand ``config_arg``'s ``get_hyper`` into validated points (nothing is run or written).

    ``base_overrides`` ({key: value}) apply to every point; ``workdir`` is the base directory
    (default: the config's ``workdir``). Raises ValueError naming the key for an unknown key, a
    value of the wrong type, a key both swept and overridden, a config without ``workdir``,
    two points with the same name, or a command line the entry point would reject."""
    file = config_arg.split(":", 1)[0]
    module = load_config_module(file)
    if not callable(getattr(module, "get_hyper", None)):
        raise ValueError(f"{file} defines no get_hyper(h); see arr_jax/hyper.py")
    entry = getattr(module, "ENTRY", DEFAULT_ENTRY)
    if not isinstance(entry, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", entry):
        raise ValueError(f"{file}: ENTRY {entry!r} is not a module name")
    raw = module.get_hyper(hyper)
    if not isinstance(raw, list) or not all(isinstance(p, dict) for p in raw):
        raise ValueError(f"{file}: get_hyper must return a list of points (h.product / h.sweep / h.zipit)")
    points = [{hyper.normalize_key(k): v for k, v in p.items()} for p in raw]
    if not points:
        raise ValueError(f"{file}: get_hyper returned no points")

    base_overrides = dict(base_overrides or {})
    base_cfg = parse_like_entry(config_arg, [f"--config.{k}={render_value(v)}" for k, v in base_overrides.items()])
    if "workdir" not in base_cfg:
        raise ValueError(f"{file} has no 'workdir' key; the sweep gives every point its own --config.workdir")
    where = file
    keys = list(dict.fromkeys(k for p in points for k in p))
    for k in keys:
        if k == "workdir":
            raise ValueError("sweep key workdir: the sweep sets each point's workdir itself")
        if k in base_overrides:
            raise ValueError(f"sweep key {k} is also given as --config.{k}; drop one of them")
        current = _lookup(base_cfg, k, where)
        for p in points:
            if k in p:
                p[k] = check_value(k, p[k], current, where)

    base_args = tuple(f"--config.{k}={render_value(v)}" for k, v in base_overrides.items() if k != "workdir")
    root = str(Path(workdir or base_cfg.workdir) / "sweep")
    short = short_names(keys)
    out, seen = [], {}
    for values in points:
        name = point_name(values, short)
        if name in seen:
            raise ValueError(f"sweep points {seen[name]} and {values} have the same name {name!r}")
        seen[name] = values
        args = tuple(f"--config.{k}={render_value(v)}" for k, v in values.items())
        point = SweepPoint(name=name, values=values, args=args, workdir=str(Path(root) / name))
        try:
            parsed = parse_like_entry(config_arg, [*base_args, f"--config.workdir={point.workdir}", *args])
        except Exception as e:  # absl's message names the flag
            raise ValueError(f"sweep point {name}: the entry point would reject its command line: {e}") from e
        for k, v in values.items():
            got = _lookup(parsed, k, where)
            if got != v or type(got) is not type(v):
                raise ValueError(f"sweep key {k}: {v!r} would reach the entry point as {got!r}")
        out.append(point)
    return SweepPlan(config_arg=config_arg, entry=entry, base_args=base_args, root=root, points=tuple(out),
                     keys=tuple(keys), short=short)


# --- running ----------------------------------------------------------------------------------

def point_state(workdir: str | Path) -> str:
    """``done`` (report.json, or a done status file), ``failed`` (last attempt exited nonzero) or
    ``pending``."""
    w = Path(workdir)
    if (w / "report.json").is_file():  # done only when it is a complete JSON report (written atomically)
        if isinstance(read_json(w / "report.json", default=None), dict):
            return "done"
    status = w / STATUS_FILE
    if status.is_file():
        st = read_json(status, default={})
        return st.get("status", "pending") if isinstance(st, dict) else "pending"
    return "pending"


def _run_point(plan: SweepPlan, point: SweepPoint, python: str) -> tuple[int, float]:
    work = Path(point.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cmd = plan.command(point, python)
    t0 = time.perf_counter()
    with open(work / LOG_FILE, "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    seconds = time.perf_counter() - t0
    atomic_write_text(work / STATUS_FILE, json.dumps(
        {"status": "done" if rc == 0 else "failed", "returncode": rc, "seconds": round(seconds, 3),
         "command": cmd}, indent=2))
    return rc, seconds


def _log_tail(workdir: str, lines: int = 15) -> str:
    try:
        text = (Path(workdir) / LOG_FILE).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    | " + t for t in text[-lines:])


def run_sweep(plan: SweepPlan, parallel: int = 1, python: str | None = None) -> dict[str, str]:
    """Run every unfinished point, ``parallel`` at a time; returns {name: state} after the runs."""
    python = python or sys.executable
    states = {p.name: point_state(p.workdir) for p in plan.points}
    todo = [p for p in plan.points if states[p.name] != "done"]
    n = len(plan.points)
    print(f"sweep {plan.config_arg}: {n} points under {plan.root}; {n - len(todo)} finished, "
          f"{len(todo)} to run ({plan.entry}, {parallel} at a time)", flush=True)
    lock = threading.Lock()
    index = {p.name: i for i, p in enumerate(plan.points, 1)}

    def one(point):
        with lock:
            print(f"[{index[point.name]}/{n}] {point.name}: running (log {Path(point.workdir) / LOG_FILE})",
                  flush=True)
        rc, seconds = _run_point(plan, point, python)
        with lock:
            states[point.name] = "done" if rc == 0 else "failed"
            if rc == 0:
                print(f"[{index[point.name]}/{n}] {point.name}: done in {seconds:.1f}s", flush=True)
            else:
                print(f"[{index[point.name]}/{n}] {point.name}: FAILED (exit {rc}) after {seconds:.1f}s; "
                      f"last lines of its log:\n{_log_tail(point.workdir)}", flush=True)

    stop = threading.Event()

    def guarded(point):
        if not stop.is_set():
            one(point)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel))
    try:
        for f in [pool.submit(guarded, p) for p in todo]:
            f.result()
    except BaseException:  # Ctrl-C: start nothing new; running points end with their own SIGINT
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return states


def dry_run_lines(plan: SweepPlan) -> list[str]:
    """One line per point: its workdir, then its overrides."""
    width = max(len(p.workdir) for p in plan.points)
    return [f"{p.workdir:<{width}}  {' '.join(p.args) or '(no overrides)'}" for p in plan.points]


def _dquote(text: str) -> str:
    return '"' + re.sub(r'(["\\$`])', r"\\\1", text) + '"'


def tpu_commands(plan: SweepPlan, tpu_name: str = "TPU_NAME", zone: str = "ZONE") -> list[str]:
    """One ``launch/tpu_pod.sh TPU ZONE "<command>"`` line per point (the script prefixes
    ``.venv/bin/``, so the command starts with ``python``)."""
    return [f"launch/tpu_pod.sh {shlex.quote(tpu_name)} {shlex.quote(zone)} "
            f"{_dquote(shlex.join(plan.command(p, 'python')))}" for p in plan.points]


# --- command line -----------------------------------------------------------------------------

def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "config file with get_hyper (configs/*.py[:variant])",
                                    lock_config=True)
    flags.mark_flag_as_required("config")
    flags.DEFINE_string("workdir", "", "base directory (default: the config's workdir); points go to <it>/sweep")
    flags.DEFINE_integer("parallel", 1, "points run at the same time")
    flags.DEFINE_bool("dry_run", False, "print one line per point (workdir, overrides) and exit")
    flags.DEFINE_bool("print_commands", False, "print one launch/tpu_pod.sh command per point and exit")
    flags.DEFINE_string("tpu_name", "TPU_NAME", "TPU name for --print_commands")
    flags.DEFINE_string("zone", "ZONE", "zone for --print_commands")
    flags.DEFINE_string("metric", "", "report.json metric to plot (default: gain, else the first number)")
    flags.DEFINE_string("plot_x", "", "swept key on the plot's x axis (default: the first varying non-seed key)")


def main(argv) -> int:
    from absl import flags
    from ml_collections import config_flags

    from arr_jax import sweep_report

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    try:
        plan = plan_sweep(config_flags.get_config_filename(f["config"]),
                          config_flags.get_override_values(f["config"]), f.workdir)
    except (ValueError, FileNotFoundError) as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    if f.dry_run or f.print_commands:
        if f.dry_run:
            print("\n".join(dry_run_lines(plan)))
        if f.print_commands:
            print("\n".join(tpu_commands(plan, f.tpu_name, f.zone)))
        return 0
    try:
        states = run_sweep(plan, f.parallel)
    except KeyboardInterrupt:
        print("sweep interrupted; rerun the same command to resume (finished points are skipped)",
              file=sys.stderr)
        return 130
    try:
        written = sweep_report.write_results(plan, states, metric=f.metric, plot_x=f.plot_x)
    except ValueError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in written))
    failed = [n for n, s in states.items() if s == "failed"]
    if failed:
        print(f"{len(failed)} of {len(states)} points failed (rerun the same command to retry them): "
              + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
