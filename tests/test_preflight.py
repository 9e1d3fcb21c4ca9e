"""`arr_jax.preflight`: the trainer's programs compiled for a TPU topology on this CPU machine (libtpu's
compiler, abstract weights), the memory figures against the analytic plan, and the errors a user can fix.

The abstract policies must describe exactly what the real builders make: the same weights (paths,
shapes, dtypes) and the same conditioning as ``encode_fn`` returns, checked on tiny snapshots.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _libtpu():
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[tpu]')")


def _shapes(state) -> dict:
    flat = nnx.to_flat_state(state) if hasattr(nnx, "to_flat_state") else state.flat_state()
    out = {}
    for path, v in flat:
        x = v.get_value() if hasattr(v, "get_value") else v
        out["/".join(map(str, path))] = (tuple(x.shape), str(x.dtype))
    return out


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    pytest.importorskip("diffusers")
    from _tiny_flux import build_tiny_pipeline

    d = tmp_path_factory.mktemp("preflight") / "flux"
    build_tiny_pipeline(d)
    return d


def _flux_cfg(model_dir, **rpo):
    import sys as _s

    _s.path.insert(0, str(ROOT / "configs"))
    import flux_dev_t2i

    c = flux_dev_t2i.get_config("tiny")
    c.model_dir = str(model_dir)
    c.judge.kind = "world"
    for k, v in rpo.items():
        c.rpo[k] = v
    return c


def test_abstract_flux_policy_is_the_built_one(tiny_flux):
    """Weights (every path, shape, dtype) and conditioning of `policies.flux.abstract` equal the built policy's."""
    from arr_jax.policies import build_policy
    from arr_jax.policies.base import PromptItem
    from arr_jax.policies.flux import abstract

    cfg = _flux_cfg(tiny_flux)
    built = build_policy(cfg)
    ab = abstract(cfg)
    assert _shapes(nnx.state(ab.policy.model)) == _shapes(nnx.state(built.model))
    assert _shapes(ab.policy.decode_params) == _shapes(built.decode_params)
    cond = built.encode_fn([PromptItem("a red cube"), PromptItem("two blue balls")])
    got = jax.tree.map(lambda c: (tuple(c.shape[1:]), str(c.dtype)), cond)
    want = jax.tree.map(lambda c: (tuple(c.shape), str(c.dtype)), ab.cond)
    assert got == want
    assert tuple(ab.policy.latent_shape) == tuple(built.latent_shape)


def test_unknown_topology_and_missing_libtpu_are_one_line():
    from arr_jax.preflight import TopologyError, tpu_slice

    with pytest.raises(TopologyError, match=r"unknown topology 'v9z-3': use one of v5p-8"):
        tpu_slice("v9z-3")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    r = subprocess.run([sys.executable, "-m", "arr_jax.preflight", "--config", "configs/flux_dev_t2i.py",
                        "--topology=v9z-3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("preflight: unknown topology 'v9z-3'")
    assert "Traceback" not in r.stderr


def test_abstract_qwen_image_edit_policy_is_the_built_one(tmp_path):
    pytest.importorskip("diffusers")
    from _tiny_qwen_image import build_tiny, save_snapshot
    from arr_jax.policies import build_policy
    from arr_jax.policies.base import PromptItem
    from arr_jax.policies.qwen_image_edit import abstract

    sys.path.insert(0, str(ROOT / "configs"))
    import qwen_image_edit

    save_snapshot(build_tiny(), "edit_plus", tmp_path / "qwen")
    cfg = qwen_image_edit.get_config("tiny")
    cfg.model_dir = str(tmp_path / "qwen")
    built = build_policy(cfg)
    ab = abstract(cfg)
    assert _shapes(nnx.state(ab.policy.model)) == _shapes(nnx.state(built.model))
    assert _shapes(ab.policy.decode_params) == _shapes(built.decode_params)
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (cfg.rpo.height, cfg.rpo.width, 3), dtype=np.uint8)
    cond = built.encode_fn([PromptItem("make it green", source=src), PromptItem("add a hat", source=src)])
    got = jax.tree.map(lambda c: (tuple(c.shape[1:]), str(c.dtype)), cond)
    want = jax.tree.map(lambda c: (tuple(c.shape), str(c.dtype)), ab.cond)
    assert got == want


def test_judge_inputs_match_the_processor():
    """The judge's abstract batch has the shapes and dtypes the real processor gives two 64x48 images."""
    from test_vlm_judge import judge_snapshot

    from arr_jax.judge.processor import Qwen3VLProcessor
    from arr_jax.preflight.programs import judge_inputs

    proc = Qwen3VLProcessor.from_dir(judge_snapshot())
    imgs = [np.zeros((64, 48, 3), np.uint8)] * 2
    chats = [([{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "x"}]}],
              imgs)] * 4
    real = proc(chats, seq_bucket=64, patch_bucket=64, image_bucket=2)
    n_text = int(real["attention_mask"][0].sum()) - int(
        np.isin(real["input_ids"][0], [proc.model_cfg.image_token_id, proc.model_cfg.vision_start_token_id,
                                      proc.model_cfg.vision_end_token_id]).sum())
    ours = judge_inputs(proc.model_cfg, rows=4, images=2, height=64, width=48, text_tokens=n_text, seq_bucket=64,
                        patch_bucket=64, image_bucket=2, image_cfg=proc.image_cfg)
    real.pop("rope_deltas", None)
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in real.items()}


def test_compiles_every_program_for_v5p8(tiny_flux):
    """Every policy program of the tiny FLUX config compiles for v5p-8 from abstract weights, with the
    compiler's memory figures, FLOPs and a roofline bound in a JSON-able report; the analytic plan's rows
    are set beside the compiled figures."""
    _libtpu()
    from arr_jax.preflight import format_report, preflight

    cfg = _flux_cfg(tiny_flux)
    rep = preflight(cfg, "v5p-8", progress=lambda s: None)
    assert set(rep["programs"]) == {"rollout", "decode", "reference", "update"}
    assert all(not p["error"] and p["compile_s"] > 0 and p["temp_bytes"] > 0 for p in rep["programs"].values()), \
        format_report(rep)
    assert rep["programs"]["update"]["flops"] > rep["programs"]["rollout"]["flops"] > 0
    assert rep["fits"] and rep["devices"] == 4 and rep["iteration_roofline_s"] > 0
    assert {r["row"] for r in rep["plan_check"]} == {"update activations", "rollout activations", "policy total"}
    json.dumps(rep)  # the --json report is JSON


def test_over_large_batch_exits_1_naming_the_program(tiny_flux, tmp_path):
    """A batch whose attention cannot fit a v5e chip's 16 GB: exit 1, the report names the breaking program."""
    _libtpu()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "arr_jax.preflight", "--config", "configs/flux_dev_t2i.py:tiny",
                        f"--config.model_dir={tiny_flux}", "--config.judge.kind=world", "--config.rpo.height=128",
                        "--config.rpo.width=128", "--config.rpo.micro_batch=2048", "--config.rpo.pairs_per_batch=1024",
                        "--topology=v5e-8", f"--json={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 1, (r.stdout + r.stderr)[-3000:]
    rep = json.loads(out.read_text())
    assert rep["fits"] is False and rep["breaks"]
    assert any(name in rep["breaks"] for name in rep["programs"])
    assert "DOES NOT FIT" in r.stdout
