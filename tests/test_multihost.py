"""One process per host, tested on one machine: 2 processes x 4 CPU devices on loopback (JAX's gloo
CPU collectives), started exactly as ``launch/gpu_multihost.sh`` starts them (``ARR_JAX_DISTRIBUTED=1``,
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), against 1 process x 8 devices:
the same LoRA, checkpoints that restore across layouts, and a killed process that stops the other."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "gpu_multihost.sh"
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), ARR_JAX_HEARTBEAT_TIMEOUT="10")
    for k in ("ARR_JAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    return env


def _start(args, cwd, processes: int) -> list[subprocess.Popen]:
    """``processes`` x (8 / processes) devices; several processes go through launch/gpu_multihost.sh."""
    cmd = [sys.executable, "-m", "arr_jax.train", *map(str, args)]
    if processes == 1:
        return [subprocess.Popen(cmd, cwd=cwd, env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)]
    port = _port()
    procs = []
    for i in range(processes):
        env = _env(8 // processes)
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                   JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(["bash", str(LAUNCH), *cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs, timeout=1200) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        o, e = p.communicate(timeout=timeout)
        out.append((p.returncode, o + e))
    return out


def _ok(results) -> str:
    for rc, text in results:
        assert rc == 0, text[-5000:]
    return results[0][1]


def _lora(workdir: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(workdir / "lora" / "final.safetensors"))


def _same_lora(a: Path, b: Path, tol: float = 1e-5) -> None:
    la, lb = _lora(a), _lora(b)
    assert la.keys() == lb.keys() and len(la) > 0
    for k in la:
        np.testing.assert_allclose(la[k], lb[k], rtol=0, atol=tol, err_msg=k)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny pretrained base policy and an induced rubric for ``configs/demo.py:tiny``."""
    tmp = tmp_path_factory.mktemp("multihost")
    cfg = [f"--config={ROOT / 'configs' / 'demo.py'}:tiny", f"--config.base_checkpoint={tmp / 'base.safetensors'}",
           f"--config.world.data_dir={tmp / 'data'}", f"--config.pretrain.workdir={tmp / 'pretrain'}"]
    env = _env(1)
    env["XLA_FLAGS"] = ""
    for module, extra in (("arr_jax.pretrain", []), ("arr_jax.induce", [f"--config.workdir={tmp / 'rubric'}"])):
        r = subprocess.run([sys.executable, "-m", module, *cfg, *extra], cwd=tmp, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    return tmp, cfg + [f"--config.judge.rubric={tmp / 'rubric' / 'rubric' / 'rubric.txt'}"]


def test_two_processes_train_as_one_and_checkpoints_cross_layouts(world):
    tmp, cfg = world
    a, b = tmp / "one_by_eight", tmp / "two_by_four"
    one = _ok(_finish(_start(cfg + [f"--config.workdir={a}"], tmp, 1)))
    two = _finish(_start(cfg + [f"--config.workdir={b}"], tmp, 2))
    _ok(two)
    assert "distributed: process 0 of 2, 4 local / 8 global cpu devices" in two[0][1]
    assert "distributed: process 1 of 2" in two[1][1]
    assert "held-out win rate against the base" in two[0][1] and "held-out win rate" not in two[1][1]
    _same_lora(a, b)
    ra, rb = (json.loads((w / "report.json").read_text()) for w in (a, b))
    assert ra["eval"]["pairs"] == rb["eval"]["pairs"] == 8  # the held-out set is split, then summed
    assert abs(ra["eval"]["win_rate"] - rb["eval"]["win_rate"]) < 1e-9
    assert "held-out win rate" in one

    # a checkpoint written by one layout restores in the other
    c = tmp / "two_then_one"
    shutil.copytree(b, c)
    out = _ok(_finish(_start(cfg + [f"--config.workdir={c}", "--config.rpo.iterations=3"], tmp, 1)))
    assert "resumed RPO from iteration 2" in out
    d = tmp / "one_then_two"
    shutil.copytree(a, d)
    out = _ok(_finish(_start(cfg + [f"--config.workdir={d}", "--config.rpo.iterations=3"], tmp, 2)))
    assert "resumed RPO from iteration 2" in out
    _same_lora(c, d)


def test_a_killed_process_stops_the_other_and_both_resume(world):
    tmp, cfg = world
    w = tmp / "killed"
    args = cfg + [f"--config.workdir={w}", "--config.rpo.iterations=5", "--config.rpo.eval_every=0"]
    procs = _start(args, tmp, 2)
    deadline = time.time() + 900
    while time.time() < deadline and not (w / "checkpoints" / "2").is_dir():
        time.sleep(0.2)
    assert (w / "checkpoints" / "2").is_dir(), _finish(procs, 5)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    try:
        out, err = procs[0].communicate(timeout=300)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("the surviving process did not stop within 300 s of its peer's death")
    procs[1].communicate()
    assert procs[0].returncode != 0 and time.time() - t0 < 300
    assert "Another process has probably died; rerun every process" in err, err[-3000:]
    assert not (w / "checkpoints" / "5").is_dir()
    out = _ok(_finish(_start(args, tmp, 2)))
    assert "resumed RPO from iteration" in out
    assert (w / "lora" / "final.safetensors").exists()


@pytest.mark.parity
def test_flux_with_the_flax_judge_two_processes_as_one(tmp_path):
    """The tiny FLUX text-to-image config with the tiny Qwen3-VL judge: 2 x 4 = 1 x 8."""
    pytest.importorskip("diffusers")
    from _tiny_flux import build_tiny_pipeline
    from arr_jax.arr.rubric_file import RubricFile
    from test_vlm_judge import judge_snapshot

    build_tiny_pipeline(tmp_path / "flux")
    RubricFile.from_text("Theme 1: Prompt alignment\n- Every object named in the prompt is present.\n").save(
        tmp_path / "rubric" / "rubric")
    (tmp_path / "p.txt").write_text("a red cat\na blue dog\nthe cat\na big dog\n")
    (tmp_path / "h.txt").write_text("a red dog\nthe blue cat\n")
    cfg = [f"--config={ROOT / 'configs' / 'flux_dev_t2i.py'}:tiny", f"--config.model_dir={tmp_path / 'flux'}",
           f"--config.prompts_file={tmp_path / 'p.txt'}", f"--config.eval.prompts_file={tmp_path / 'h.txt'}",
           f"--config.judge.rubric={tmp_path / 'rubric' / 'rubric.txt'}", "--config.judge.kind=qwen3_vl",
           f"--config.judge.model_dir={judge_snapshot()}", "--config.rpo.iterations=2", "--config.rpo.eval_every=2"]
    a, b = tmp_path / "a", tmp_path / "b"
    _ok(_finish(_start(cfg + [f"--config.workdir={a}"], tmp_path, 1)))
    _ok(_finish(_start(cfg + [f"--config.workdir={b}"], tmp_path, 2)))
    _same_lora(a, b)
