"""The ``qwen_image_edit`` policy kind and ``python -m arr_jax.sample`` for Qwen-Image on tiny random
snapshots: encode / apply / decode against the parity-tested pipeline, precompute and release,
sampling from a JSONL of (prompt, sources), bad inputs. (RPO through ``python -m arr_jax.train`` and
the policy's LoRA export: tests/test_qwen_image_train.py.)"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arr_jax.policies.base import PromptItem

ROOT = Path(__file__).resolve().parents[1]


def qwen_config(arg="tiny"):
    spec = importlib.util.spec_from_file_location("cfg_qwen_image_edit", ROOT / "configs" / "qwen_image_edit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    pytest.importorskip("diffusers")
    from _tiny_qwen_image import build_tiny, save_snapshot

    t = build_tiny()
    return {k: save_snapshot(t, k, tmp_path_factory.mktemp(f"qwen_policy_{k}")) for k in ("t2i", "edit", "edit_plus")}


def _cfg(dirs, snapshot="edit_plus", **over):
    cfg = qwen_config()
    cfg.model_dir, cfg.cache_dir = str(dirs[snapshot]), ""
    for k, v in over.items():
        node = cfg
        *path, last = k.split("__")
        for p in path:
            node = node[p]
        node[last] = v
    return cfg


def _items(n=2, seed=0):
    rng = np.random.default_rng(seed)
    texts = ["make the sky green", "add a hat to the man", "remove the car"]
    return [PromptItem(texts[i % 3], source=rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), origin=f"t:{i}")
            for i in range(n)]


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["edit_plus", "edit"])
def test_policy_functions_reproduce_the_pipeline(dirs, kind):
    """Two Euler steps with the policy's apply_fn on its encode_fn's conditioning give the pipeline's
    (diffusers-parity) sample without CFG; decode_fn turns it into the same uint8 image."""
    from arr_jax.diffusion.qwen_image_pipeline import qwen_sigmas
    from arr_jax.diffusion.sde import ode_step
    from arr_jax.policies import build_policy

    policy = build_policy(_cfg(dirs, kind))
    assert policy.kind == "qwen_image_edit" and policy.is_editing and policy.latent_shape == (4, 16)
    assert policy.identity["pipeline"] == kind and policy.identity["text_len"] == 320
    items = _items(2)
    cond = policy.encode_fn(items)
    assert cond["txt"].shape == (2, 320, 64) and cond["txt_mask"].shape == (2, 320)
    assert cond["source"].shape == (2, 4, 16)
    pipe = policy.info["pipeline"]
    lat = np.asarray(pipe.noise([3, 4], pipe.latent_space(32, 32)))
    sig, ts = qwen_sigmas(2, 4, pipe.snap.scheduler)

    @jax.jit
    def two_steps(state, x, cond):
        from flax import nnx

        model = nnx.merge(graphdef, state)
        for i in range(2):
            v = policy.apply_fn(model, x, jnp.full((2,), ts[i]), cond)
            x = ode_step(v, x, sig[i], sig[i + 1])
        return x

    from flax import nnx

    graphdef, state = nnx.split(policy.model)
    x0 = two_steps(state, jnp.asarray(lat), cond)
    ref = pipe.sample([it.text for it in items], [[it.source] for it in items], num_steps=2, latents=lat,
                      height=32, width=32, true_cfg_scale=1.0)
    np.testing.assert_allclose(np.asarray(x0), ref.latents, rtol=1e-5, atol=1e-5)
    img = np.asarray(jax.jit(policy.decode_fn)(policy.decode_params, x0))
    assert img.dtype == np.uint8 and img.shape == (2, 32, 32, 3)
    want = np.clip(np.round((ref.images + 1.0) * 127.5), 0, 255).astype(np.uint8)
    assert np.abs(img.astype(int) - want).max() <= 1


@pytest.mark.parity
def test_precompute_release_and_bad_items(dirs):
    from arr_jax.policies import build_policy

    policy = build_policy(_cfg(dirs))
    items = _items(3)
    policy.precompute(items)
    pipe = policy.info["pipeline"]
    assert pipe.stats["encoded"] == 3 and pipe.snap.text_encoder is None  # Qwen2.5-VL freed
    cond = policy.encode_fn(items[:2])  # from the cache
    assert pipe.stats["encoded"] == 3 and cond["txt"].shape[0] == 2
    with pytest.raises(RuntimeError, match="text encoder was released"):
        policy.encode_fn(_items(1, seed=9))
    with pytest.raises(ValueError, match="prompt t:0 has no source image"):
        policy.encode_fn([PromptItem("x", origin="t:0")])
    with pytest.raises(ValueError, match=r"source image is \(16, 32, 3\), the policy needs \(32, 32, 3\)"):
        policy.encode_fn([PromptItem("x", source=np.zeros((16, 32, 3), np.uint8))])
    short = build_policy(_cfg(dirs, qwen__text_len=16))
    with pytest.raises(ValueError, match=r"t:0 gives \d+ text states .*more than qwen.text_len=16"):
        short.encode_fn(_items(1))



def test_an_over_long_prompt_fails_in_precompute_naming_its_line(dirs):
    """b11: a prompt longer than qwen.text_len is refused by precompute (before iteration 0, before any
    prompt is encoded), naming its file:line and the text_len that fits; that text_len then works.
    The count comes from the tokenizer alone and equals the encoder's state count."""
    from arr_jax.policies import build_policy

    rng = np.random.default_rng(0)
    src = lambda: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # noqa: E731
    items = [PromptItem("make the sky green", source=src(), origin="edits.jsonl:1"),
             PromptItem("make the sky green " + "and add a red hat " * 60, source=src(), origin="edits.jsonl:2")]
    policy = build_policy(_cfg(dirs))
    pipe = policy.info["pipeline"]
    with pytest.raises(ValueError, match=r"^prompt edits\.jsonl:2 gives (\d+) text states \(with its source image\), "
                                         r"more than qwen\.text_len=320: shorten it, or set --config\.qwen\.text_len="
                                         r"(\d+)$") as e:
        policy.precompute(items)
    assert pipe.prompts.stats["encoded"] == 0 and pipe.snap.text_encoder is not None  # refused before encoding
    import re

    n, need = map(int, re.search(r"gives (\d+) .*text_len=(\d+)$", str(e.value)).groups())
    _, cond, _ = pipe.prepare_sources([[it.source] for it in items])
    assert pipe.prompts.state_lengths([it.text for it in items], cond) == [
        s.shape[0] for s in pipe.prompts([it.text for it in items], cond)]
    assert pipe.prompts.state_lengths([items[1].text], cond[1:]) == [n] and need == -(-n // 64) * 64
    fits = build_policy(_cfg(dirs, qwen__text_len=need))
    fits.precompute(items)
    assert fits.encode_fn(items)["txt"].shape[:2] == (2, need)

def test_policy_refuses_other_snapshots(dirs):
    from arr_jax.convert.snapshot import SnapshotError
    from arr_jax.policies import build_policy

    with pytest.raises(SnapshotError, match="holds a Qwen-Image t2i pipeline, but edit or edit_plus"):
        build_policy(_cfg(dirs, "t2i"))


# ------------------------------------------------------------------------ python -m arr_jax.sample

def _write_jobs(tmp_path, lines):
    rng = np.random.default_rng(0)
    from PIL import Image

    (tmp_path / "img").mkdir(exist_ok=True)
    for name, (h, w) in {"a": (24, 72), "b": (48, 32), "odd": (30, 32)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{name}.png")
    f = tmp_path / "edits.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return f


@pytest.mark.parity
def test_sample_entry_point_writes_edits(dirs, tmp_path):
    from PIL import Image

    from arr_jax import sample

    jobs = _write_jobs(tmp_path, [{"prompt": "make the sky green", "source": "img/a.png"},
                                  {"prompt": "put picture 2 into picture 1", "source": ["img/a.png", "img/b.png"]}])
    cfg = _cfg(dirs, prompts_file=str(jobs), outdir=str(tmp_path / "out"))
    written = sample.run_qwen_image(cfg)
    assert sorted(p.name for p in written) == ["00000_s0.png", "00001_s0.png"]  # sizes differ: no grid
    out = written[0].parent  # this run's own folder under outdir
    index = json.loads((out / "samples.json").read_text())
    assert len(index["images"]["00001_s0.png"]["sources"]) == 2
    # the output takes vae_area (64^2) at the last source's aspect ratio, as diffusers does
    assert np.asarray(Image.open(out / "00000_s0.png")).shape == (32, 96, 3)
    assert np.asarray(Image.open(out / "00001_s0.png")).shape == (64, 64, 3)


def test_sample_bad_inputs_are_named(dirs, tmp_path):
    from arr_jax import sample
    from arr_jax.convert.snapshot import SnapshotError

    many = _write_jobs(tmp_path, [{"prompt": "x", "source": ["img/a.png"] * 4}])
    with pytest.raises(ValueError, match=r"prompt 1 .* has 4 source images, but Qwen-Image-Edit-2509 takes at most 3"):
        sample.run_qwen_image(_cfg(dirs, prompts_file=str(many)))
    odd = _write_jobs(tmp_path, [{"prompt": "x", "source": "img/odd.png"}])
    with pytest.raises(ValueError, match=r"source image .*odd\.png size 30x32 .*not divisible by 16"):
        sample.run_qwen_image(_cfg(dirs, prompts_file=str(odd), qwen__vae_area=0))
    with pytest.raises(SnapshotError, match="holds a Qwen-Image pipeline, but kind 'qwen_image_edit' needs"):
        sample.run_qwen_image(_cfg(dirs, "t2i", prompts_file=str(odd)))
    nosrc = _write_jobs(tmp_path, [{"prompt": "x"}])
    with pytest.raises(ValueError, match=r"edits\.jsonl:1: no 'source' image"):
        sample.run_qwen_image(_cfg(dirs, prompts_file=str(nosrc)))
    missing = _write_jobs(tmp_path, [{"prompt": "x", "source": "img/nope.png"}])
    with pytest.raises(FileNotFoundError, match=r"edits\.jsonl:1: source image .*nope\.png does not exist"):
        sample.run_qwen_image(_cfg(dirs, prompts_file=str(missing)))


@pytest.mark.parity
def test_sample_text_to_image(dirs, tmp_path):
    from arr_jax import sample

    (tmp_path / "p.txt").write_text("a red cat on the blue sofa\nmake the sky green\n")
    cfg = _cfg(dirs, "t2i", kind="qwen_image", prompts_file=str(tmp_path / "p.txt"), outdir=str(tmp_path / "out"),
               sample__height=32, sample__width=48, sample__batch_size=2)
    names = sorted(p.name for p in sample.run_qwen_image(cfg))
    assert names == ["00000_s0.png", "00001_s0.png", "grid.png"]
