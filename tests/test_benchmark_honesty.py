"""Benchmarks that cannot lie: gpu_suite.sh picks the project's interpreter and fails when a
benchmark fails; a ratio the timings cannot resolve is shown as such, never as a speedup.

These run no benchmark: the suite is driven with stand-in interpreters (shell scripts), and
`report.resolve` with made-up timings.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402

IMPORT_OK = """#!/bin/sh
# a stand-in interpreter: the suite's import check passes ({marker}); every benchmark {bench}
if [ "$1" = "-c" ]; then echo "{marker} python 3 jax 0"; exit 0; fi
case "$1" in benchmarks/report.py) exit 0 ;; esac
{bench_cmd}
"""


def _fake(path: Path, marker: str, bench: str, bench_cmd: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(IMPORT_OK.format(marker=marker, bench=bench, bench_cmd=bench_cmd))
    path.chmod(0o755)
    return path


def _suite(root: Path, tmp: Path, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    e.update(OUT=str(tmp / "out"), **env)
    return subprocess.run(["bash", str(root / "benchmarks" / "gpu_suite.sh"), "--preset", "tiny"], cwd=tmp, env=e,
                          capture_output=True, text=True, timeout=120)


def _copy_suite(tmp: Path) -> Path:
    root = tmp / "repo"
    (root / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "gpu_suite.sh", root / "benchmarks" / "gpu_suite.sh")
    return root


def test_an_interpreter_without_jax_stops_the_suite_and_is_named(tmp_path):
    bad = tmp_path / "nojax-python"
    bad.write_text("#!/bin/sh\nexit 1\n")
    bad.chmod(0o755)
    r = _suite(ROOT, tmp_path, PYTHON=str(bad))
    assert r.returncode == 2
    assert str(bad) in r.stderr and "cannot import jax" in r.stderr and "PYTHON=" in r.stderr
    assert not (tmp_path / "out" / "suite.md").exists()


def test_the_project_venv_is_used_when_present(tmp_path):
    root = _copy_suite(tmp_path)
    venv = _fake(root / ".venv" / "bin" / "python", "VENV-PYTHON", "writes its JSON",
                 'out=""; while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done; echo "{}" > "$out"')
    r = _suite(root, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "interpreter: VENV-PYTHON" in r.stdout
    log = (tmp_path / "out" / "suite.log").read_text()
    assert "# interpreter: VENV-PYTHON" in log and venv.exists()


def test_a_failing_benchmark_fails_the_suite_and_is_named(tmp_path):
    root = _copy_suite(tmp_path)
    _fake(root / ".venv" / "bin" / "python", "VENV-PYTHON", "fails",
          'case "$*" in *judge.py*) exit 3 ;; esac\n'
          'out=""; while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done; echo "{}" > "$out"')
    r = _suite(root, tmp_path)
    assert r.returncode == 1
    assert "1 step(s) failed: judge (exit 3)" in r.stderr


def test_a_benchmark_that_writes_no_json_fails_the_suite(tmp_path):
    root = _copy_suite(tmp_path)
    _fake(root / ".venv" / "bin" / "python", "VENV-PYTHON", "exits 0 silently", "exit 0")
    r = _suite(root, tmp_path)
    assert r.returncode == 1
    for name in ("rollout", "update", "judge", "iteration"):
        assert f"{name} (exit 0 but no " in r.stderr


def _t(*times):
    return {"times_s": list(times)}


def test_ratio_within_the_repeats_spread_is_not_a_speedup():
    # the case: one run 9.87x, the next 0.32x -- repeats that vary more than the ratio
    status, shown = report.resolve(1.5, [_t(0.010, 0.031)], [_t(0.015, 0.016)], resolution_s=1e-9)
    assert status == "noise" and "not resolved" in shown and "x3.10" in shown
    # slower by 1.5x but one side varies x2: also not resolved
    assert report.resolve(1 / 1.5, [_t(0.02, 0.04)], [_t(0.02, 0.021)], resolution_s=1e-9)[0] == "noise"
    # a ratio above both sides' spread is shown as the number
    status, shown = report.resolve(2.5, [_t(0.010, 0.012)], [_t(0.025, 0.028)], resolution_s=1e-9)
    assert (status, shown) == ("ok", "2.5")


def test_calls_below_the_timer_resolution_are_not_a_speedup():
    status, shown = report.resolve(10.0, [_t(2e-6, 2e-6)], [_t(2e-5, 2e-5)], resolution_s=1e-7)
    assert status == "below_resolution" and "timer resolution" in shown
    assert report.resolve(10.0, [_t(2e-3, 2e-3)], [_t(2e-2, 2e-2)], resolution_s=1e-7)[0] == "ok"
    assert 0 < report.timer_resolution_s() < 1e-3


def test_one_repeat_or_a_missing_side_is_said():
    assert report.resolve(3.0, [_t(0.1)], [_t(0.3)])[0] == "one_repeat"
    assert report.resolve(None, [_t(0.1, 0.1)], [])[0] == "missing"


def test_add_ratio_and_the_table_print_the_verdict():
    row = {"row": "x", "ours": 10.0, "ref": 5.0}
    report.add_ratio(row, "ours", "ref", [_t(0.10, 0.30)], [_t(0.20, 0.21)])
    assert row["ratio"] == pytest.approx(2.0) and row["ratio_status"] == "noise"
    md = report.table([row], [("metric", "row"), ("ratio", "ratio_shown")])
    assert "not resolved: repeats vary x3.00 > ratio 2" in md and "| 2 |" not in md
