"""The user's path: one-line errors whose hints work when followed, outputs that never overwrite each
other, and the warning about a judge whose one-order reward is position bias."""
from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from arr_jax.judge.base import PairwiseBatch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["two red circles on the left", "one blue square on the top",
           "three green triangles on the right", "one yellow circle on the bottom"]


class FirstWins:
    """A judge that always prefers the first image: pure position bias."""

    def compare(self, prompts, images1, images2):
        n = len(prompts)
        return PairwiseBatch(winner=np.ones(n, np.int8), p_first=np.ones(n, np.float32))


class Brighter:
    """A fair judge: the brighter image wins, whichever order it is shown in."""

    def compare(self, prompts, images1, images2):
        a = np.asarray(images1, np.float64).mean(axis=(1, 2, 3))
        b = np.asarray(images2, np.float64).mean(axis=(1, 2, 3))
        w = np.where(a > b, 1, np.where(b > a, 2, 0)).astype(np.int8)
        return PairwiseBatch(winner=w, p_first=np.where(w == 1, 1.0, np.where(w == 2, 0.0, 0.5)))


@pytest.mark.parametrize("judge,biased", [(FirstWins(), True), (Brighter(), False)])
def test_order_flip_rate_is_measured_and_a_biased_judge_warned_about_once(judge, biased, caplog, tmp_path):
    from conftest import make_tiny_trainer

    tr = make_tiny_trainer(judge=judge, micro_batch=8, num_steps=3)
    with caplog.at_level(logging.WARNING, logger="arr_jax.rpo.trainer"):
        ms = [tr.step(PROMPTS) for _ in range(3)]
    assert [m["order_flip_rate"] for m in ms] == [1.0 if biased else 0.0] * 3
    assert ms[-1]["order_flip_rate_run"] == (1.0 if biased else 0.0) and tr.order_flips["pairs"] == 12
    warned = [r for r in caplog.records if "order-flip rate" in r.getMessage()]
    assert len(warned) == (1 if biased else 0)  # once, after 8 pairs
    if not biased:
        return
    assert "judge.symmetrize=agree" in warned[0].getMessage()
    # the counts are saved with the checkpoint: a resumed run goes on counting and does not warn again
    from arr_jax.checkpoint import Checkpointer
    from arr_jax.rpo.run import restore_checkpoint, save_checkpoint

    ckpt = Checkpointer(tmp_path / "ckpt")
    save_checkpoint(ckpt, tr, [{"iteration": 3}])
    ckpt.wait()
    tr.order_flips = {"flips": 0.0, "pairs": 0.0, "warned": False}  # as a fresh process starts
    tr.iteration = 0
    assert restore_checkpoint(Checkpointer(tmp_path / "ckpt"), tr)["history"] == [{"iteration": 3}]
    assert tr.iteration == 3 and tr.order_flips == {"flips": 12.0, "pairs": 12.0, "warned": True}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="arr_jax.rpo.trainer"):
        m = tr.step(PROMPTS)
    assert m["order_flip_rate_run"] == 1.0 and tr.order_flips["pairs"] == 16
    assert not [r for r in caplog.records if "order-flip rate" in r.getMessage()]


def test_order_flip_check_keys_are_in_the_judge_config_and_checked():
    from arr_jax.cli import describe_keys, load_config, validate

    cfg = load_config(str(ROOT / "configs/flux_dev_t2i.py") + ":tiny")
    assert (cfg.judge.order_check_pairs, cfg.judge.order_flip_warn) == (4, 0.3)
    listing = describe_keys(str(ROOT / "configs/flux_dev_t2i.py") + ":tiny", "order_")
    assert "judge.order_check_pairs = 4    # pairs per iteration" in listing and "judge.order_flip_warn = 0.3" in listing
    cfg.judge.order_flip_warn = 1.5
    with pytest.raises(ValueError, match="judge.order_flip_warn"):
        validate(cfg, "train")


def test_progress_lines_say_what_is_slow_and_stay_quiet_when_asked(capsys, monkeypatch):
    """Each program says when it compiles (with its seconds) and the first judging says it waits, on
    stderr; a second iteration compiles nothing and says nothing; ARR_JAX_QUIET=1 silences it all."""
    from conftest import make_tiny_trainer

    monkeypatch.delenv("ARR_JAX_QUIET", raising=False)
    tr = make_tiny_trainer(micro_batch=8, num_steps=3)
    tr.step(PROMPTS)
    err = capsys.readouterr().err.splitlines()
    for prog in ("rollout", "decode", "reference", "update"):
        assert f"compiling the {prog} program ..." in err, err
        secs = [float(m.group(1)) for line in err if (m := re.fullmatch(rf"compiled {prog} in (\d+\.\d) s", line))]
        assert len(secs) == 1 and secs[0] == round(tr._instrumented[prog].compile_s, 1), err
    assert err.index("compiling the update program ...") > err.index("compiling the rollout program ...")
    judged = [line for line in err if line.startswith("judging the first 4 pairs (")]
    assert len(judged) == 2 and judged[0].endswith(" ...") and re.search(r": done in \d+\.\d s$", judged[1])
    tr.step(PROMPTS)
    assert capsys.readouterr().err == ""  # nothing new to compile, the judge already announced
    import jax

    from arr_jax.progress import Announced, note, stage

    monkeypatch.setenv("ARR_JAX_QUIET", "1")
    with stage("loading"):
        note("a line")
    assert int(Announced(jax.jit(lambda x: x + 1), "tiny")(np.ones(3, np.int32))[0]) == 2
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------ sample outputs

def _flux_cfg(config: str, **over):
    from arr_jax.cli import load_config

    cfg = load_config(f"{ROOT / 'configs' / config}:tiny")
    for k, v in over.items():
        cfg[k] = v
    return cfg


def test_two_sample_runs_in_one_folder_keep_both_and_edits_show_their_source(tmp_path):
    pytest.importorskip("diffusers")
    import json

    from diffusers import FluxKontextPipeline
    from PIL import Image

    from _tiny_flux import build_tiny_pipeline, save_snapshot
    from arr_jax import sample

    pipe = build_tiny_pipeline(tmp_path / "flux")
    save_snapshot(FluxKontextPipeline(**pipe.components), tmp_path / "kontext")
    (tmp_path / "a.txt").write_text("a red cat\na blue dog\n")
    (tmp_path / "b.txt").write_text("the cat on a dog\n")
    out = tmp_path / "out"
    common = dict(model_dir=str(tmp_path / "flux"), outdir=str(out), cache_dir=str(tmp_path / "cache"))
    first = sample.run(_flux_cfg("flux_dev_t2i.py", prompts_file=str(tmp_path / "a.txt"), **common))
    second = sample.run(_flux_cfg("flux_dev_t2i.py", prompts_file=str(tmp_path / "b.txt"), **common))
    assert first[0].parent == out / "base_ode2_seed0" and second[0].parent == out / "base_ode2_seed0-2"
    a = json.loads((out / "base_ode2_seed0" / "samples.json").read_text())
    b = json.loads((out / "base_ode2_seed0-2" / "samples.json").read_text())
    assert [v["prompt"] for v in a["images"].values()] == ["a red cat", "a blue dog"]
    assert [v["prompt"] for v in b["images"].values()] == ["the cat on a dog"]
    assert a["settings"]["lora_path"] == "" and a["settings"]["sampler"] == "ode" and "guidance" in a["settings"]
    again = sample.run(_flux_cfg("flux_dev_t2i.py", prompts_file=str(tmp_path / "a.txt"), **common))
    assert again[0].parent == out / "base_ode2_seed0"  # the same run again: its own folder
    # editing: the grid shows each source beside its edit
    src = tmp_path / "src.png"
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(src)
    (tmp_path / "sources.txt").write_text("src.png\n")
    (tmp_path / "edit.txt").write_text("make it red\n")
    cfg = _flux_cfg("flux_kontext.py", model_dir=str(tmp_path / "kontext"), outdir=str(out),
                    cache_dir=str(tmp_path / "cache"), prompts_file=str(tmp_path / "edit.txt"),
                    sources_file=str(tmp_path / "sources.txt"))
    cfg.sample.batch_size = 8  # one row per device of the 8-device mesh
    written = sample.run(cfg)
    grid = np.asarray(Image.open(written[-1]))
    edit = np.asarray(Image.open(written[0]))
    assert grid.shape == (edit.shape[0], 2 * edit.shape[1] + 2, 3)
    assert (grid[:, :edit.shape[1]] == 7).all() and np.array_equal(grid[:, -edit.shape[1]:], edit)


# ------------------------------------------------------------------------------ hints that lead somewhere

def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


def _hint(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith(("error:", "FATAL"))]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def test_the_hints_of_the_commonest_mistakes_work_when_followed(tmp_path):
    """Each error's fix-it command, run as printed, makes the failing command work."""
    from arr_jax.cli import check_inputs, load_config

    (tmp_path / "configs").symlink_to(ROOT / "configs")
    # evaluate without its rubric: the hint's induce command makes exactly the file evaluate reads
    line = _hint(_cli(["-m", "arr_jax.evaluate", "--config", "configs/evaluate_world.py:tiny"], tmp_path))
    make = re.search(r"make it with `([^`]+)`", line).group(1)
    assert make == "python -m arr_jax.induce --config configs/evaluate_world.py:tiny".replace("evaluate", "induce")
    r = _cli(shlex.split(make)[1:], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli(["-m", "arr_jax.evaluate", "--config", "configs/evaluate_world.py:tiny"], tmp_path)
    assert r.returncode == 0 and "rubric:" in r.stdout, r.stderr[-3000:]
    # ... and its "without a rubric" alternative is evaluate's own key
    assert "--config.conditions=direct" in line and "judge.rubric" not in line
    # train on the demo config before its rubric exists: the demo's own induce step and path
    line = _hint(_cli(["-m", "arr_jax.train", "--config", "configs/demo.py:tiny"], tmp_path))
    assert "make it with `python -m arr_jax.induce --config configs/demo.py:tiny` (it writes runs/tiny/rubric/" in line
    cfg = load_config(str(ROOT / "configs/demo.py") + ":tiny")
    cfg.judge.rubric = ""  # the hint's direct-judge alternative, --config.judge.rubric=''
    check_inputs(cfg, "train")
    # an API judge without a model: the key the hint names exists in train's config and suffices
    line = _hint(_cli(["-m", "arr_jax.train", "--config", "configs/demo.py:tiny", "--config.judge.kind=api",
                       "--config.judge.rubric="], tmp_path))
    key = re.search(r"--config\.([\w.]+)=<model", line).group(1)
    assert key == "judge.model"
    cfg.judge.kind, cfg.judge.model = "api", "gpt-5"
    check_inputs(cfg, "train")
    # a mistyped key: one line naming the close key, which then parses
    line = _hint(_cli(["-m", "arr_jax.train", "--config", "configs/demo.py:tiny", "--config.rpo.iteratons=3"], tmp_path))
    assert "did you mean --config.rpo.iterations" in line
    # a relative --config from another directory: the absolute path it names exists
    other = tmp_path / "elsewhere"
    other.mkdir()
    line = _hint(_cli(["-m", "arr_jax.train", "--config", "configs/demo.py:tiny"], other))
    path = re.search(r"pass --config (\S+?):tiny", line).group(1)
    assert Path(path).is_file() and Path(path).samefile(ROOT / "configs" / "demo.py")
    # the key listing documents the keys with a default and help
    r = _cli(["-m", "arr_jax.cli", "configs/demo.py:tiny", "rpo.iterations"], tmp_path)
    assert r.returncode == 0 and "rpo.iterations = 2" in r.stdout, r.stderr


def test_sample_accepts_qwen_image_and_train_says_why_not():
    from arr_jax.cli import load_config, validate

    cfg = load_config(str(ROOT / "configs/qwen_image_edit.py") + ":tiny")
    cfg.kind = "qwen_image"
    validate(cfg, "sample")
    with pytest.raises(ValueError, match=r"kind: 'qwen_image' .*python -m arr_jax.sample"):
        validate(cfg, "train")


def test_kontext_sample_with_fewer_prompts_than_devices(tmp_path, capsys, monkeypatch):
    """One edit on the 8-device mesh with the config's batch size (2): the batch is padded to the mesh
    (as the trainer pads), and each written edit is the one a batch of its own gives."""
    pytest.importorskip("diffusers")
    import json

    from diffusers import FluxKontextPipeline
    from PIL import Image

    from _tiny_flux import build_tiny_pipeline, save_snapshot
    from arr_jax import sample

    save_snapshot(FluxKontextPipeline(**build_tiny_pipeline(tmp_path / "flux").components), tmp_path / "kontext")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "sources.txt").write_text("a.png\nb.png\na.png\n")
    (tmp_path / "edit.txt").write_text("make it red\nmake it blue\nmake it green\n")
    cfg = _flux_cfg("flux_kontext.py", model_dir=str(tmp_path / "kontext"), outdir=str(tmp_path / "out"),
                    cache_dir=str(tmp_path / "cache"), prompts_file=str(tmp_path / "edit.txt"),
                    sources_file=str(tmp_path / "sources.txt"))
    assert cfg.sample.batch_size < 8 and cfg.sample.images_per_prompt == 1
    monkeypatch.delenv("ARR_JAX_QUIET", raising=False)
    capsys.readouterr()
    written = sample.run(cfg)  # was IndivisibleError: shape=[2,1,1,1,4] vs data=8
    err = capsys.readouterr().err.splitlines()
    assert f"loading the flux_kontext weights from {tmp_path / 'kontext'} ..." in err
    assert "each batch of sample.batch_size=2 prompts is padded to 8 rows (the mesh's data-parallel devices); " \
           "--config.sample.batch_size=8 would use them all" in err
    assert [re.sub(r"\d+\.\d", "S", line) for line in err if line.startswith("first batch")] == [
        "first batch: encoding its prompts, compiling the sampler and the decoder ...",
        "first batch: encoding its prompts, compiling the sampler and the decoder: done in S s"]
    assert [p.name for p in written] == ["00000_s0.png", "00001_s0.png", "00002_s0.png", "grid.png"]
    index = json.loads((written[0].parent / "samples.json").read_text())["images"]
    assert [v["prompt"] for v in index.values()] == ["make it red", "make it blue", "make it green"]
    # the padding rows change nothing: the three edits in one batch of the mesh's size are the same images
    cfg.sample.batch_size, cfg.outdir = 8, str(tmp_path / "one_batch")
    together = sample.run(cfg)
    for a, b in zip(written[:3], together[:3]):
        np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_launch_scripts_without_their_prerequisites_say_what_to_do(tmp_path):
    """gpu_multihost.sh outside Slurm, without the JAX_* variables or a command, and tpu_pod.sh without
    its arguments or gcloud: one line each, exit 2, nothing started."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS"))}
    marker = tmp_path / "ran"

    def one_line(*args, **extra):
        r = subprocess.run([shutil.which("bash"), *map(str, args)], env={**env, **extra}, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and r.stdout == "" and not marker.exists(), (r.returncode, r.stdout, r.stderr)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        return lines[0]

    gpu, tpu = ROOT / "launch" / "gpu_multihost.sh", ROOT / "launch" / "tpu_pod.sh"
    line = one_line(gpu, "touch", marker)
    assert "not inside a Slurm job" in line and "srun --nodes=N" in line and "JAX_COORDINATOR_ADDRESS" in line
    assert "no command given" in one_line(gpu, SLURM_JOB_ID="1")
    # with the explicit variables the command runs (how tests/test_multihost.py starts its processes)
    r = subprocess.run(["bash", str(gpu), "touch", str(marker)], env={**env, "JAX_COORDINATOR_ADDRESS": "x:1",
                       "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and marker.exists()
    marker.unlink()
    assert "TPU_NAME ZONE" in one_line(tpu, "my-v5e", "us-west4-a")
    empty = tmp_path / "bin"
    empty.mkdir()
    assert "gcloud not found" in one_line(tpu, "my-v5e", "us-west4-a", f"touch {marker}", PATH=str(empty))


def test_ctrl_c_is_one_line_saying_where_to_resume(tmp_path):
    """Ctrl-C (KeyboardInterrupt) ends an entry point with exit 130 and one line naming the checkpoint to
    resume from (or saying there is none yet), no traceback."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "entry.py"
    script.write_text("from arr_jax.cli import config_from_flags, run_main\n\n"
                      "def main(argv):\n    config_from_flags()\n    raise KeyboardInterrupt\n\nrun_main(main)\n")
    for steps, want in (([], "Nothing was checkpointed yet"), ([1, 3], "resume from iteration 3")):
        work = tmp_path / f"run{len(steps)}"
        for s in steps:
            (work / "checkpoints" / str(s)).mkdir(parents=True)
        r = subprocess.run([sys.executable, str(script), f"--config={root / 'configs' / 'demo.py'}",
                            f"--config.workdir={work}", "--config.judge.rubric="], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert r.returncode == 130, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("interrupted (Ctrl-C).") and want in last and str(work / "checkpoints") in last
