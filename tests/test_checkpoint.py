"""Tests for arr_jax.checkpoint: round trip, sharded restore, mismatch errors, SIGKILL safety."""
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from arr_jax.checkpoint import Checkpointer, CheckpointMismatchError
from arr_jax.sharding import make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_state(seed=0):
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    lora = {"a": jnp.full((4, 2), 0.5), "b": jnp.zeros((2, 3))}
    opt_state = optax.adamw(1e-3).init({"params": params, "lora": lora})
    return {
        "params": params,
        "lora": lora,
        "opt_state": opt_state,
        "rng": jax.random.key(seed + 1),
        "raw_rng": jax.random.PRNGKey(seed + 2),
        "step": jnp.int32(7),
        "data_rng": np.random.default_rng(0).integers(0, 9, size=(5,)),
        "np_scalar": np.int64(3),
    }


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert isinstance(x, jax.Array) == isinstance(y, jax.Array)
        assert isinstance(x, jax.Array) or type(x) is type(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_with_optimizer_keys_and_extra(tmp_path):
    state = _train_state()
    # One adam update so mu/nu/count are not all zeros.
    grads = jax.tree.map(jnp.ones_like, {"params": state["params"], "lora": state["lora"]})
    _, state["opt_state"] = optax.adamw(1e-3).update(grads, state["opt_state"], {"params": state["params"], "lora": state["lora"]})
    extra = {"data_position": 123, "config": {"lr": 1e-3, "model": "tiny"}, "metrics": {"loss": np.float32(0.5)}}

    ckpt = Checkpointer(tmp_path / "ckpt", model_signature={"model": "tiny", "dims": (4, 3)})
    assert ckpt.save(7, state, extra=extra)
    ckpt.close()

    ckpt = Checkpointer(tmp_path / "ckpt", model_signature={"model": "tiny", "dims": (4, 3)})
    assert ckpt.latest_step() == 7
    restored, got_extra = ckpt.restore(_train_state(seed=5))  # target values differ; structure matches
    _assert_same(restored, state)
    assert isinstance(restored["params"], nnx.State)
    assert jax.random.key_impl(restored["rng"]) == jax.random.key_impl(state["rng"])
    # typed key still works as a key
    np.testing.assert_array_equal(jax.random.normal(restored["rng"], (2,)), jax.random.normal(state["rng"], (2,)))
    assert got_extra == {"data_position": 123, "config": {"lr": 1e-3, "model": "tiny"}, "metrics": {"loss": 0.5}}

    # Abstract target (ShapeDtypeStruct) and no target at all.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.Array) else x, state)
    restored, _ = ckpt.restore(abstract)
    _assert_same(restored, state)
    flat, _ = ckpt.restore()
    assert flat["params.kernel"].shape == (4, 3)
    assert jax.dtypes.issubdtype(flat["rng"].dtype, jax.dtypes.prng_key)
    meta = ckpt.metadata()
    assert meta["leaves"]["opt_state.0.mu.lora.a"] == {"shape": [4, 2], "dtype": "float32"}
    ckpt.close()


def test_retention_interval_and_async(tmp_path):
    state = {"w": jnp.arange(4.0)}
    ckpt = Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2, async_save=True)
    assert not ckpt.save(1, state)
    assert ckpt.save(1, state, force=True)
    for step in (2, 4, 6):
        assert ckpt.save(step, {"w": state["w"] + step})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 6] and ckpt.latest_step() == 6
    restored, extra = ckpt.restore(state, step=4)
    np.testing.assert_array_equal(restored["w"], np.arange(4.0) + 4)
    assert extra == {}
    ckpt.close()


def test_restore_into_sharded_target():
    import tempfile

    mesh = make_mesh(data=8)
    with tempfile.TemporaryDirectory() as d:
        w = jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16)
        saved = {"w": jax.device_put(w, NamedSharding(mesh, P("data", None))), "key": jax.random.key(3), "b": jnp.ones(16)}
        ckpt = Checkpointer(d)
        ckpt.save(0, saved)
        target = {
            "w": jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=NamedSharding(mesh, P(None, "data"))),
            "key": jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, P())),
            "b": jax.ShapeDtypeStruct((16,), jnp.float32, sharding=NamedSharding(mesh, P("data"))),
        }
        restored, _ = ckpt.restore(target)
        ckpt.close()
    for name in ("w", "b", "key"):
        assert restored[name].sharding == target[name].sharding, name
    assert len(restored["w"].addressable_shards) == 8
    np.testing.assert_array_equal(restored["w"], w)
    np.testing.assert_array_equal(restored["b"], np.ones(16))
    np.testing.assert_array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(jax.random.key(3)))


def test_mismatch_errors_name_paths(tmp_path):
    big = {"transformer_blocks": [{"attn": {"to_q": {"kernel": jnp.zeros((64, 64))}}}], "norm": jnp.ones(64), "old": jnp.ones(2)}
    Checkpointer(tmp_path, model_signature={"hidden": 64, "depth": 1}).save(1, big)

    small = {"transformer_blocks": [{"attn": {"to_q": {"kernel": jnp.zeros((32, 32))}}}], "norm": jnp.ones(64, jnp.bfloat16), "new": jnp.ones(3)}
    with pytest.raises(CheckpointMismatchError) as e:
        Checkpointer(tmp_path).restore(small)
    msg = str(e.value)
    assert "written for a different model" in msg
    assert "transformer_blocks.0.attn.to_q.kernel stored (64, 64) expected (32, 32)" in msg
    assert "norm stored (64,) float32 expected (64,) bfloat16" in msg
    assert "new missing from checkpoint (expected (3,) float32)" in msg
    assert "old in checkpoint ((2,) float32) but not in target" in msg

    with pytest.raises(CheckpointMismatchError, match=r"model_signature.hidden stored 64 expected 32"):
        Checkpointer(tmp_path, model_signature={"hidden": 32, "depth": 1}).restore(big)


def test_missing_empty_and_half_written(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"no checkpoint found.*nope"):
        Checkpointer(missing).restore()
    assert Checkpointer(missing).latest_step() is None
    assert not missing.exists()  # reading does not create the directory

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint found in .*empty"):
        Checkpointer(tmp_path / "empty").restore()

    ckpt = Checkpointer(tmp_path / "c")
    ckpt.save(1, {"w": jnp.ones(3)})
    ckpt.close()
    partial = tmp_path / "c" / "2.orbax-checkpoint-tmp-1234567"  # an interrupted save
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_text("x")
    ckpt = Checkpointer(tmp_path / "c")
    assert ckpt.all_steps() == [1]
    restored, _ = ckpt.restore({"w": jnp.zeros(3)})
    np.testing.assert_array_equal(restored["w"], np.ones(3))
    assert ckpt.save(2, {"w": jnp.full(3, 2.0)})  # the step of the interrupted save is writable again
    ckpt.close()


_CHILD = """
import sys, jax, jax.numpy as jnp, numpy as np
from arr_jax.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1], max_to_keep=2)
step = 0
while True:
    step += 1
    state = {"w": jnp.full((128, 256), step, jnp.float32), "b": np.full((4096,), step, np.int32),
             "step": jnp.int32(step), "key": jax.random.key(step)}
    ckpt.save(step, state, extra={"step": step})
    print(step, flush=True)
"""


def _state_like(step):
    return {"w": jnp.full((128, 256), step, jnp.float32), "b": np.full((4096,), step, np.int32),
            "step": jnp.int32(step), "key": jax.random.key(step)}


def test_sigkill_mid_save_leaves_a_complete_checkpoint(tmp_path):
    d = tmp_path / "ckpt"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(d)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    guard = threading.Timer(60, proc.kill)
    guard.start()
    try:
        done = 0
        while done < 3:
            line = proc.stdout.readline()
            assert line, "child exited before saving 3 checkpoints"
            done = int(line)
        # Kill while a step is being written, if we can catch one.
        deadline = time.time() + 5
        while time.time() < deadline and not any("tmp" in n for n in os.listdir(d)):
            time.sleep(0.0005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        guard.cancel()
        proc.kill()
    assert proc.returncode == -signal.SIGKILL

    ckpt = Checkpointer(d)
    last = ckpt.latest_step()
    assert last is not None and last >= done
    restored, extra = ckpt.restore(_state_like(0))
    assert extra == {"step": last}
    _assert_same(restored, _state_like(last))
    # Resuming writes the next step even if the killed save left a temporary directory for it.
    assert ckpt.save(last + 1, _state_like(last + 1))
    assert ckpt.latest_step() == last + 1
    ckpt.close()


# --------------------------------------------------------------------------- state on disk checked (#19, kind 8)


def _two_steps(d):
    import jax.numpy as jnp

    ck = Checkpointer(d.absolute(), max_to_keep=3)
    ck.save(1, {"w": jnp.arange(4.0)}, force=True)
    ck.save(2, {"w": jnp.arange(4.0) + 1}, force=True)
    ck.wait()
    ck.close()
    return {"w": jnp.arange(4.0)}


def test_b20_incomplete_newest_step_is_skipped_and_named(tmp_path, capsys):
    """b20: step 3 is an interrupted copy of step 2 (only _CHECKPOINT_METADATA): resume restores step 2,
    says which folder it skipped, moves it aside, and a later save of step 3 works."""
    import shutil

    import jax.numpy as jnp

    d = tmp_path / "ckpt"
    state = _two_steps(d)
    shutil.copytree(d / "2", d / "3")
    for p in (d / "3").rglob("*"):
        if p.is_file() and p.name != "_CHECKPOINT_METADATA":
            p.unlink()
    ck = Checkpointer(d.absolute(), max_to_keep=3)
    assert ck.latest_step() == 2 and ck.all_steps() == [1, 2]
    got, _ = ck.restore(state)
    assert float(got["w"][0]) == 1.0
    out = capsys.readouterr().out
    assert f"checkpoint folder {d.absolute() / '3'} is incomplete" in out and "missing meta/metadata" in out
    assert ck.skipped == [str(d.absolute() / "3")] and (d / "3.incomplete").is_dir()
    ck.save(3, {"w": jnp.arange(4.0) + 2}, force=True)
    ck.wait()
    assert Checkpointer(d.absolute()).restore(state)[0]["w"][0] == 2.0


def test_truncated_array_file_in_newest_step_falls_back(tmp_path, capsys):
    """A newest step whose index files are there but whose array data was cut short fails to read: restore
    (latest) sets it aside, naming it, and returns the step before."""
    d = tmp_path / "ckpt"
    state = _two_steps(d)
    for p in (d / "2" / "state").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            p.write_bytes(p.read_bytes()[:7])
    ck = Checkpointer(d.absolute(), max_to_keep=3)
    got, _ = ck.restore(state)
    assert float(got["w"][0]) == 0.0
    assert f"checkpoint folder {d.absolute() / '2'} is incomplete (reading it failed" in capsys.readouterr().out


def test_small_state_files_are_atomic_and_validated(tmp_path):
    from arr_jax.checkpoint import atomic_write_json, read_json

    p = atomic_write_json(tmp_path / "sub" / "report.json", {"iterations": 3})
    assert read_json(p, required=("iterations",)) == {"iterations": 3}
    assert [x.name for x in p.parent.iterdir()] == ["report.json"]  # no temporary left behind
    p.write_text('{"iterations": 3, "ev')  # a truncated file is never taken as done
    with pytest.raises(ValueError, match=r"report\.json is not a complete JSON file"):
        read_json(p)
    assert read_json(p, default=None) is None
    with pytest.raises(ValueError, match=r"lacks the keys \['done'\]"):
        read_json(atomic_write_json(tmp_path / "m.json", {"x": 1}), required=("done",))


def test_truncated_report_is_not_a_finished_sweep_point(tmp_path):
    from arr_jax.sweep import point_state

    (tmp_path / "report.json").write_text('{"gain": 0.1, "eval": {')
    assert point_state(tmp_path) == "pending"
    (tmp_path / "report.json").write_text('{"gain": 0.1}')
    assert point_state(tmp_path) == "done"


def test_damaged_cache_entries_are_recomputed(tmp_path):
    """Text-embedding and prompt-rubric cache entries cut short are misses, not crashes or answers."""
    from arr_jax.diffusion.flux_pipeline import PromptCache
    from arr_jax.judge.reward import PromptRubrics

    cache = PromptCache(tmp_path / "emb", "f" * 64)
    cache.put("a hat", {"txt": np.ones((2, 3), np.float32)})
    f = cache._file("a hat")
    f.write_bytes(f.read_bytes()[:40])
    assert PromptCache(tmp_path / "emb", "f" * 64).get("a hat") is None

    class Backend:
        name = "b"
        calls = 0

        def generate(self, reqs):
            Backend.calls += len(reqs)
            return ['{"rubrics": ["the hat is red"]}'] * len(reqs)

    pr = PromptRubrics(Backend(), tmp_path / "pr", k=1)
    assert pr.criteria(["a red hat"]) == [["the hat is red"]]
    entry = next((tmp_path / "pr").rglob("*.json"))
    entry.write_text(entry.read_text()[:15])
    assert PromptRubrics(Backend(), tmp_path / "pr", k=1).criteria(["a red hat"]) == [["the hat is red"]]
    assert Backend.calls == 2


def test_prompt_rubric_cache_keys_on_endpoint_sampling_and_weights(tmp_path):
    from arr_jax.judge.reward import PromptRubrics, prompt_rubric_identity

    base = {"model": "m", "endpoint": "http://a/v1", "temperature": 0.0, "max_tokens": 0, "timeout": 10}
    key = lambda ident: PromptRubrics(object(), None, identity=ident).key  # noqa: E731
    k0 = key(prompt_rubric_identity("api", base))
    assert key(prompt_rubric_identity("api", {**base, "endpoint": "http://b/v1"})) != k0
    assert key(prompt_rubric_identity("api", {**base, "temperature": 0.7})) != k0
    assert key(prompt_rubric_identity("api", {**base, "timeout": 99})) == k0  # transport only
    from safetensors.numpy import save_file

    save_file({"w": np.zeros((64, 64), np.float32)}, str(tmp_path / "model.safetensors"))
    k1 = key(prompt_rubric_identity("qwen3_vl", {"model_dir": str(tmp_path)}, str(tmp_path)))
    save_file({"w": np.ones((64, 64), np.float32)}, str(tmp_path / "model.safetensors"))  # same shapes, new weights
    assert key(prompt_rubric_identity("qwen3_vl", {"model_dir": str(tmp_path)}, str(tmp_path))) != k1
