"""``config.log.wandb``: a tiny world run logs to Weights & Biases offline (no network) the same scalars as
TensorBoard, the held-out evaluation grids and the final LoRA as an artifact; read back from the W&B run
directory's own record file. Skipped when wandb (the optional extra) is not installed."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_policy

ROOT = Path(__file__).resolve().parents[1]


def read_wandb_records(path: Path) -> list:
    """The protobuf records (``wandb.proto.wandb_internal_pb2.Record``) of a W&B ``run-<id>.wandb`` file: a
    7-byte header (``:W&B``, magic, version) then LevelDB log records (crc32c, length, type: full / first /
    middle / last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    out, pos, block, buf = [], 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + n]
        pos += 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def read_tensorboard_scalars(logdir: Path) -> dict[tuple[str, int], float]:
    """``{(tag, step): value}`` of the scalars in tensorboardX event files (TFRecords: length u64, its crc,
    the ``Event`` proto, its crc)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for f in sorted(logdir.glob("events.out.tfevents.*")):
        data, pos = f.read_bytes(), 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event()
            ev.ParseFromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    out[(v.tag, int(ev.step))] = float(v.simple_value)
    return out


def _history(records) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = rows.setdefault(int(r.history.step.num), {})
            for item in r.history.item:
                keys = list(item.nested_key) or [item.key]
                row.setdefault(keys[0], {} if len(keys) > 1 else None)
                if len(keys) > 1:
                    row[keys[0]][keys[1]] = json.loads(item.value_json)
                else:
                    row[keys[0]] = json.loads(item.value_json)
    return rows


def test_offline_run_holds_scalars_grids_and_the_lora(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    sys.path.insert(0, str(ROOT / "configs"))
    import demo as demo_config

    from arr_jax.convert.lora_peft import save_peft_lora
    from arr_jax.data.prompts import world_prompts
    from arr_jax.judge.factory import build_judge, judge_config
    from arr_jax.rpo.run import RPORun, build_evaluator, train
    from arr_jax.rpo.trainer import RPOTrainer, rpo_settings

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for k in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_DIR"):
        monkeypatch.delenv(k, raising=False)
    cfg = demo_config.get_config("tiny")
    cfg.workdir = str(tmp_path / "run")
    cfg.log.wandb = True
    cfg.log.wandb_name = "tiny-offline"
    cfg.judge = judge_config(kind="world_programmatic")
    cfg.rpo.iterations, cfg.rpo.eval_every, cfg.rpo.checkpoint_every = 2, 1, 2
    cfg.rpo.num_steps, cfg.rpo.train_window, cfg.rpo.pairs_per_batch, cfg.rpo.micro_batch = 2, (0, 1), 4, 8
    cfg.eval.num_prompts, cfg.eval.grid_prompts = 4, 2
    work = Path(cfg.workdir)
    policy = make_tiny_policy()
    judge = build_judge(cfg.judge, workdir=work)
    ev = world_prompts("heldout")[:4]
    run = RPORun(cfg=cfg, policy=policy, judge=judge, evaluator=build_evaluator(cfg, judge, ev, work),
                 trainer=RPOTrainer(policy, judge, rpo_settings(cfg.rpo), seed=0, trainable="lora"),
                 train_prompts=world_prompts("train"), eval_prompts=ev, workdir=work)
    policy.export_lora = lambda model, path, meta: save_peft_lora(model, path, metadata=meta)
    hist = train(run, progress=False)

    (rundir,) = list((work / "wandb").glob("offline-run-*"))
    run_id = (work / "wandb_run_id").read_text().strip()
    assert rundir.name.endswith(run_id)
    records = read_wandb_records(rundir / f"run-{run_id}.wandb")
    rows = _history(records)
    assert sorted(rows) == [1, 2]
    # every scalar TensorBoard got, with its value, at the same step
    tb = read_tensorboard_scalars(work / "tensorboard")
    assert {"reward_mean", "kl", "eval/win_rate", "eval/accuracy", "time/iteration"} <= {t for t, _ in tb}
    assert len(tb) > 40
    for (tag, step), value in tb.items():
        assert rows[step][tag] == pytest.approx(value, rel=1e-6), (tag, step)
    for step, h in zip((1, 2), hist):
        assert rows[step]["reward_mean"] == pytest.approx(h["reward_mean"])
        assert rows[step]["kl"] == pytest.approx(h["kl"])
    # the evaluation grid of each step, as an image file in the run directory
    for step in (1, 2):
        grid = rows[step]["eval/grid"]
        assert grid["_type"] == "image-file" and grid["format"] == "png"
        png = rundir / "files" / grid["path"]
        assert png.exists()
        from PIL import Image

        want = np.asarray(Image.open(work / "eval" / f"eval_{step:05d}.png").convert("RGB"))
        np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGB")), want)
    # the final LoRA as an artifact, with the run's metadata
    (art,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert art.type == "lora" and art.name == f"lora-{run_id}"
    assert [e.path for e in art.manifest.contents] == ["final.safetensors"]
    meta = json.loads(art.metadata)
    assert meta["iteration"] == 2 and meta["judge"]["kind"] == "world_programmatic" and meta["init_lora"] is None
    # the W&B config is the run's metadata with the config
    cfg_rec = [r.config for r in records if r.WhichOneof("record_type") == "config"]
    run_rec = [r.run for r in records if r.WhichOneof("record_type") == "run"][0]
    assert run_rec.display_name == "tiny-offline"
    keys = {u.key for c in cfg_rec for u in c.update} | {u.key for u in run_rec.config.update}
    assert {"config", "rpo", "resume_signature"} <= keys


def test_wandb_off_by_default_and_bad_mode_named():
    sys.path.insert(0, str(ROOT / "configs"))
    import demo as demo_config
    import flux_dev_t2i

    from arr_jax.rpo.wandb_log import check_wandb, start_wandb

    for c in (demo_config.get_config("tiny"), flux_dev_t2i.get_config("tiny")):
        assert c.log.wandb is False and start_wandb(c, Path("/nonexistent"), {}) is None
    c = demo_config.get_config("tiny")
    c.log.wandb, c.log.wandb_mode = True, "offlne"
    with pytest.raises(ValueError, match="log.wandb_mode: 'offlne'"):
        check_wandb(c)
