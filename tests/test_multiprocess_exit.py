"""A failing process never hangs the others (issue #19, b18): 2 processes x 1 CPU device on loopback
(gloo collectives, ``arr_jax.cli.run_main``), one per way a process can fail while its peer waits in
the next collective: a Python exception, SIGTERM, SIGKILL (of the coordinator, process 0) and a hung
process (SIGSTOP). The four pairs run at once, so the whole file takes one start-up plus the heartbeat
timeout (~15 s on 2 busy cores)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT = 4  # s: ARR_JAX_HEARTBEAT_TIMEOUT, how long a hung process goes unnoticed
pytestmark = pytest.mark.slow

WORKER = '''
import os
import time

from arr_jax.cli import run_main


def main(argv):
    import jax

    from arr_jax.multihost import sum_over_processes

    sum_over_processes({"warm": 1.0})
    if jax.process_index() == int(os.environ["VICTIM"]):
        print("victim ready", flush=True)
        if os.environ["MODE"] == "raise":
            raise RuntimeError("the judge API gave up on its pairs (APIError)")
        time.sleep(600)  # waits for its signal
    print("waiting in the next collective", flush=True)
    sum_over_processes({"reward": 1.0})
    print("past the collective", flush=True)


run_main(main)
'''

# mode -> (victim process, signal sent once the victim is ready)
CASES = {"raise": (1, None), "sigterm": (1, signal.SIGTERM), "sigkill": (0, signal.SIGKILL),
         "hung": (1, signal.SIGSTOP)}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{mode: (seconds from the failure until every live process had left, [(returncode, log)] x 2)}."""
    tmp = tmp_path_factory.mktemp("exit")
    (tmp / "worker.py").write_text(WORKER)
    base = dict(os.environ, ARR_JAX_DISTRIBUTED="1", JAX_NUM_PROCESSES="2", JAX_PLATFORMS="cpu", XLA_FLAGS="",
                ARR_JAX_HEARTBEAT_TIMEOUT=str(HEARTBEAT), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get(
                    "PYTHONPATH", ""))
    procs, logs = {}, {}
    for mode, (victim, _) in CASES.items():
        port = _port()
        for i in range(2):
            logs[mode, i] = tmp / f"{mode}{i}.log"
            env = dict(base, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_PROCESS_ID=str(i), MODE=mode,
                       VICTIM=str(victim))
            procs[mode, i] = subprocess.Popen([sys.executable, str(tmp / "worker.py")], env=env, cwd=tmp,
                                              stdout=open(logs[mode, i], "w"), stderr=subprocess.STDOUT)
    failed_at, left_at = {}, {}
    deadline = time.time() + 120
    try:
        while time.time() < deadline and len(left_at) < len(CASES):
            for mode, (victim, sig) in CASES.items():
                if mode not in failed_at and "victim ready" in logs[mode, victim].read_text():
                    if sig is not None:
                        time.sleep(0.3)  # let the peer enter its collective
                        procs[mode, victim].send_signal(sig)
                    failed_at[mode] = time.time()
                live = [procs[mode, i] for i in range(2) if not (mode == "hung" and i == victim)]
                if mode in failed_at and mode not in left_at and all(p.poll() is not None for p in live):
                    left_at[mode] = time.time()
            time.sleep(0.1)
    finally:
        for (mode, i), p in procs.items():
            if p.poll() is None:
                if mode == "hung":
                    p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait()
    return {mode: (left_at[mode] - failed_at[mode] if mode in left_at else None,
                   [(procs[mode, i].returncode, logs[mode, i].read_text()) for i in range(2)]) for mode in CASES}


def _peer_said_so(log: str) -> None:
    assert "past the collective" not in log
    assert "error: process" in log and "Another process has probably died; rerun every process" in log, log[-3000:]


def test_an_exception_on_one_process_stops_both_at_once(runs):
    took, ((rc0, log0), (rc1, log1)) = runs["raise"]
    assert took is not None and took < HEARTBEAT, (took, log0[-2000:], log1[-2000:])
    assert rc1 == 1 and "RuntimeError: the judge API gave up on its pairs (APIError)" in log1
    assert "error: process 1 of 2 failed (exit 1); leaving now without waiting for the other processes" in log1
    assert rc0 == 1
    _peer_said_so(log0)


def test_sigterm_stops_the_process_and_its_peer(runs):
    took, ((rc0, log0), (rc1, log1)) = runs["sigterm"]
    assert took is not None and took < HEARTBEAT, (took, log0[-2000:], log1[-2000:])
    assert rc1 == 128 + signal.SIGTERM and "error: process 1 of 2 received SIGTERM; stopping now" in log1
    assert rc0 == 1
    _peer_said_so(log0)


def test_a_killed_coordinator_stops_its_peer(runs):
    took, ((rc0, _), (rc1, log1)) = runs["sigkill"]
    assert took is not None and took < HEARTBEAT, (took, log1[-2000:])
    assert rc0 == -signal.SIGKILL and rc1 == 1
    _peer_said_so(log1)


def test_a_hung_process_stops_its_peer_within_the_heartbeat_timeout(runs):
    took, ((rc0, log0), _) = runs["hung"]
    assert took is not None and took < 3 * HEARTBEAT, (took, log0[-3000:])
    assert rc0 != 0 and "past the collective" not in log0
    assert "This most likely indicates that another task died" in log0, log0[-3000:]
