"""Kill-anywhere resume of RPO training, and clear errors on bad input."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import make_tiny_trainer

from arr_jax.checkpoint import Checkpointer, CheckpointMismatchError

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""  # one CPU device, like a laptop run
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _cmd(module, tmp, *overrides):
    return [sys.executable, "-m", module, f"--config={ROOT / 'configs/demo.py'}:tiny",
            f"--config.base_checkpoint={tmp / 'base.safetensors'}", f"--config.world.data_dir={tmp / 'data'}",
            f"--config.pretrain.workdir={tmp / 'pretrain'}", *overrides]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("base")
    r = subprocess.run(_cmd("arr_jax.pretrain", tmp), cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp / "base.safetensors").exists() and (tmp / "base.json").exists()
    return tmp


def _final_trainable(workdir: Path, step: int):
    flat, extra = Checkpointer(workdir / "checkpoints").restore(step=step)
    return {k: np.asarray(v) for k, v in flat.items() if k.startswith("trainable.")}, extra


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_same_parameters(tiny_base):
    iters = ["--config.rpo.iterations=4", "--config.rpo.checkpoint_every=1", "--config.rpo.eval_every=0"]
    a = tiny_base / "run_a"
    r = subprocess.run(_cmd("arr_jax.train", tiny_base, f"--config.workdir={a}", *iters), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    b = tiny_base / "run_b"
    proc = subprocess.Popen(_cmd("arr_jax.train", tiny_base, f"--config.workdir={b}", *iters), cwd=ROOT,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not (b / "checkpoints" / "2").is_dir():
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (b / "checkpoints" / "2").is_dir(), "run B never reached its second checkpoint"
    assert not (b / "checkpoints" / "4").is_dir(), "run B finished before it was killed"
    r = subprocess.run(_cmd("arr_jax.train", tiny_base, f"--config.workdir={b}", *iters), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed RPO from iteration" in r.stdout + r.stderr

    ta, ea = _final_trainable(a, 4)
    tb, eb = _final_trainable(b, 4)
    assert ta.keys() == tb.keys() and len(ta) > 0
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)
    assert [h["reward_mean"] for h in ea["history"]] == [h["reward_mean"] for h in eb["history"]]


def test_unknown_config_key_is_named():
    r = subprocess.run([sys.executable, "-m", "arr_jax.train", "--config.rpo.learning_rat=1e-4"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "learning_rat" in r.stderr


def test_bad_config_value_is_named():
    sys.path.insert(0, str(ROOT / "configs"))
    import demo as demo_config

    from arr_jax.cli import validate

    cfg = demo_config.get_config("tiny")
    cfg.rpo.clip_eps = 2.0
    with pytest.raises(ValueError, match="clip_eps"):
        validate(cfg)
    cfg = demo_config.get_config("tiny")
    cfg.model.patch_size = 5
    with pytest.raises(ValueError, match="world.image_size"):
        validate(cfg)
    with pytest.raises(ValueError, match="unknown demo config variant"):
        demo_config.get_config("huge")


def test_missing_checkpoints_are_clear(tmp_path):
    from arr_jax.world.policy import load_base

    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        Checkpointer(tmp_path / "nowhere").restore()
    with pytest.raises(FileNotFoundError, match="arr_jax.pretrain"):
        load_base(None, tmp_path / "missing.safetensors")


def test_checkpoint_of_another_model_shape_is_refused(tmp_path):
    a = make_tiny_trainer()
    ck = Checkpointer(tmp_path / "ck")
    ck.save(1, a.state_dict(), force=True)
    ck.wait()
    b = make_tiny_trainer(lora=False)  # full fine-tuning: a different trainable tree
    with pytest.raises(CheckpointMismatchError, match="transformer_blocks"):
        Checkpointer(tmp_path / "ck").restore(b.state_dict())
    jax.clear_caches()


@pytest.mark.slow
def test_tiny_demo_end_to_end_report_pictures_and_keep_best(tiny_base):
    """The demo's whole path at the tiny size: report fields, pictures, probe-best weights."""
    import json

    work = tiny_base / "demo"
    r = subprocess.run(_cmd("arr_jax.demo", tiny_base, f"--config.workdir={work}", "--config.rpo.iterations=3",
                            "--config.rpo.eval_every=1", "--config.rpo.keep_best=True"),
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-2].startswith("base_accuracy") and lines[-1].startswith("rpo_accuracy")
    assert "keep_best: using the weights after iteration" in r.stdout
    rep = json.loads((work / "report.json").read_text())
    for k in ("base_accuracy", "rpo_accuracy", "steps", "seconds", "gain", "gain_se", "best_iteration"):
        assert k in rep, k
    assert rep["steps"] == 3 and rep["n_images"] == 8
    assert {"gain/colour", "gain_se/colour", "gain/clean_background"} <= set(rep["paired"])
    assert (work / "reward_curve.png").stat().st_size > 0 and (work / "before_after.png").stat().st_size > 0
    # The run ends on the probe-best weights, which are stored in workdir/best.
    best = Checkpointer(work / "best")
    flat, extra = best.restore()
    assert extra["iteration"] == rep["best_iteration"] and 1 <= extra["iteration"] <= 3
    hist = json.loads(json.dumps(rep["last_metrics"]))
    assert hist["best_iteration"] == extra["iteration"]
