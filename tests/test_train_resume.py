"""The demo entry point at the tiny size, config errors, checkpoint errors (kill-and-resume of
``python -m arr_jax.train`` is in test_train_entry.py)."""
import os
import subprocess
import sys
from pathlib import Path

import jax
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
    """The demo's whole path at the tiny size (induce, RPO, report): report fields, pictures, best weights."""
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
    assert rep["steps"] == 3 and rep["n_images"] == 16  # 8 held-out prompts x 2 seeds
    assert rep["rubric"]["sha256"] and rep["rubric"]["path"].endswith("rubric/rubric.txt")
    assert (work / "rubric" / "rubric.txt").exists() and (work / "lora" / "final.safetensors").exists()
    assert {"gain/colour", "gain_se/colour", "gain/clean_background"} <= set(rep["paired"])
    assert (work / "reward_curve.png").stat().st_size > 0 and (work / "before_after.png").stat().st_size > 0
    # The run ends on the best held-out weights, which are stored in workdir/best.
    best = Checkpointer(work / "best")
    flat, extra = best.restore()
    assert extra["iteration"] == rep["best_iteration"] and 1 <= extra["iteration"] <= 3
    hist = json.loads(json.dumps(rep["last_metrics"]))
    assert hist["best_iteration"] == extra["iteration"]


def test_longer_pretraining_starts_from_the_given_base(tiny_base, tmp_path):
    """``pretrain.init_from`` loads an earlier base (at learning rate 1e-7 the output stays within 1e-5
    of it, where a fresh init differs by O(0.1); its JSON says where it started); a base of another
    model shape is refused by name."""
    from safetensors.numpy import load_file

    out = tmp_path / "longer.safetensors"
    r = subprocess.run(_cmd("arr_jax.pretrain", tiny_base, f"--config.pretrain.init_from={tiny_base / 'base.safetensors'}",
                            f"--config.base_checkpoint={out}", f"--config.pretrain.workdir={tmp_path / 'pt'}",
                            "--config.pretrain.learning_rate=1e-7", "--config.pretrain.steps=4",
                            "--config.pretrain.loss_floor=0.1"),
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(str(tiny_base / "base.safetensors")), load_file(str(out))
    assert a.keys() == b.keys()
    assert max(float(abs(a[k] - b[k]).max()) for k in a) < 1e-5
    import json
    assert json.loads(out.with_suffix(".json").read_text())["init_from"] == str(tiny_base / "base.safetensors")

    r = subprocess.run(_cmd("arr_jax.pretrain", tiny_base, f"--config.pretrain.init_from={tiny_base / 'base.safetensors'}",
                            f"--config.base_checkpoint={tmp_path / 'other.safetensors'}",
                            f"--config.pretrain.workdir={tmp_path / 'pt2'}", "--config.model.head_dim=16",
                            "--config.model.rope_dims=(4, 6, 6)"),
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "base.safetensors" in r.stderr, r.stderr[-2000:]
