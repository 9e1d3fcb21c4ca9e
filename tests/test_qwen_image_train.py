"""ARR-RPO on Qwen-Image-Edit-2509 through ``python -m arr_jax.train --config configs/qwen_image_edit.py:tiny``:
a tiny random diffusers snapshot, the tiny Flax Qwen3-VL judge and a rubric, 8 fake CPU devices; first-step
ratio exactly 1, the LoRA export (diffusers naming, run metadata), kill-and-resume gives the same LoRA."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("arr_jax.rpo.run")  # the training entry point

ROOT = Path(__file__).resolve().parents[1]
RUBRIC = "Theme 1: Instruction\n- The requested edit is visible.\n- Untouched regions match Image BASE.\n"


def _env(devices: int = 8) -> dict:
    import os

    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    pytest.importorskip("diffusers")
    from PIL import Image

    from _tiny_qwen_image import build_tiny, save_snapshot
    from arr_jax.arr.rubric_file import RubricFile
    from test_vlm_judge import judge_snapshot

    d = tmp_path_factory.mktemp("qwen_train")
    tiny = build_tiny()
    save_snapshot(tiny, "edit_plus", d / "qwen")
    rf = RubricFile.from_text(RUBRIC)
    rf.save(d / "rubric" / "rubric")
    (d / "edits" / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, p in enumerate(["make the sky green", "add a hat to the man", "remove the car", "turn the dog into a cat"]):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(d / "edits" / "images" / f"s{i}.png")
        rows.append(json.dumps({"prompt": p, "source": f"images/s{i}.png"}))
    (d / "edits" / "train.jsonl").write_text("\n".join(rows) + "\n")
    (d / "edits" / "heldout.jsonl").write_text("\n".join(rows[:2]) + "\n")
    return {"dir": d, "tiny": tiny, "qwen": d / "qwen", "judge": Path(judge_snapshot()),
            "rubric": d / "rubric" / "rubric.txt", "rubric_sha": rf.sha256}


def _args(f, workdir, *extra):
    e = f["dir"] / "edits"
    return [f"--config={ROOT / 'configs' / 'qwen_image_edit.py'}:tiny", f"--config.model_dir={f['qwen']}",
            f"--config.prompts_file={e / 'train.jsonl'}", f"--config.eval.prompts_file={e / 'heldout.jsonl'}",
            "--config.judge.kind=qwen3_vl", f"--config.judge.model_dir={f['judge']}",
            f"--config.judge.rubric={f['rubric']}", f"--config.workdir={workdir}", *extra]


def _train(args, cwd, devices=8):
    return subprocess.run([sys.executable, "-m", "arr_jax.train", *map(str, args)], cwd=cwd, env=_env(devices),
                          capture_output=True, text=True, timeout=1500)


@pytest.mark.slow
@pytest.mark.parity
def test_two_rpo_iterations_on_qwen_image_edit(files, tmp_path):
    """The issue's command: exits 0; first-step ratio exactly 1; the final LoRA (diffusers names, rubric
    sha256 in its metadata) loads into diffusers' QwenImageEditPlusPipeline and reproduces our sample."""
    import torch
    from PIL import Image

    from arr_jax.convert.lora_peft import load_peft_lora, lora_config_from_file, read_run_metadata
    from arr_jax.diffusion.qwen_image_pipeline import QwenImagePipeline
    from _tiny_qwen_image import COND_AREA, VAE_AREA, small_areas

    w = tmp_path / "run"
    _ok(_train(_args(files, w, "--config.rpo.iterations=2", "--config.rpo.eval_every=2"), cwd=tmp_path))
    report = json.loads((w / "report.json").read_text())
    assert report["last_metrics"]["ratio_max_dev_first_step"] == 0.0
    final = w / "lora" / "final.safetensors"
    meta = read_run_metadata(final)
    assert meta["rubric_sha256"] == files["rubric_sha"] and meta["rpo"]["lora_rank"] == 2
    assert sorted(lora_config_from_file(final).targets)[0].startswith("transformer_blocks.0.attn.")

    ours = QwenImagePipeline.from_pretrained(files["qwen"], vae_area=VAE_AREA, condition_area=COND_AREA,
                                             lora=lora_config_from_file(final))
    load_peft_lora(ours.transformer, final)
    src = np.asarray(Image.open(files["dir"] / "edits" / "images" / "s0.png"))
    lat = np.array(ours.noise([1], ours.latent_space(32, 32)))
    out = ours.sample(["make the sky green"], [[src]], num_steps=2, latents=lat, height=32, width=32)
    pipe = files["tiny"]["pipes"]["edit_plus"]
    pipe.load_lora_weights(str(final), adapter_name="rpo")
    try:
        with torch.no_grad(), small_areas():
            ref = pipe(image=[Image.fromarray(src)], prompt=["make the sky green"], height=32, width=32,
                       num_inference_steps=2, latents=torch.from_numpy(lat), true_cfg_scale=1.0,
                       output_type="latent").images.numpy()
    finally:
        pipe.unload_lora_weights()
    assert np.linalg.norm(out.latents - ref) / np.linalg.norm(ref) <= 1e-4


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_lora(files, tmp_path):
    from safetensors.numpy import load_file

    extra = ["--config.rpo.iterations=3", "--config.rpo.checkpoint_every=1", "--config.rpo.eval_every=0"]
    a = tmp_path / "a"
    _ok(_train(_args(files, a, *extra), cwd=tmp_path))
    b = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "arr_jax.train", *map(str, _args(files, b, *extra))],
                            cwd=tmp_path, env=_env(8), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 1200
    while time.time() < deadline and not (b / "checkpoints" / "1").is_dir():
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (b / "checkpoints" / "1").is_dir() and not (b / "checkpoints" / "3").is_dir()
    out = _ok(_train(_args(files, b, *extra), cwd=tmp_path))
    assert "resumed RPO from iteration" in out
    la, lb = load_file(str(a / "lora" / "final.safetensors")), load_file(str(b / "lora" / "final.safetensors"))
    assert la.keys() == lb.keys() and len(la) > 0
    for k in la:
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)
