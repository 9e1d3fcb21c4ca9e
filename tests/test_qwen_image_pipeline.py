"""Qwen-Image pipelines (text-to-image, Edit, Edit-Plus/2509): prompt embeddings and whole-pipeline
parity with diffusers on tiny random snapshots, schedule, bad inputs, sampling entry point."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from arr_jax.convert.qwen_image_snapshot import load_qwen_image_snapshot, qwen2_tokenizer, read_qwen_model_index
from arr_jax.convert.snapshot import SnapshotError
from arr_jax.diffusion.qwen_image_pipeline import calculate_dimensions
from arr_jax.diffusion.qwen_image_text import QwenImagePromptEncoder, prompt_text

PROMPTS = ["make the sky green", "add a hat to the man and remove the car"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny diffusers pipelines and three snapshots (t2i, edit, edit_plus) of the same weights."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from _tiny_qwen_image import build_tiny, save_snapshot

    t = build_tiny()
    t["dirs"] = {k: save_snapshot(t, k, tmp_path_factory.mktemp(f"qwen_{k}")) for k in ("t2i", "edit", "edit_plus")}
    return t


@pytest.fixture(scope="module")
def snaps(tiny):
    return {k: load_qwen_image_snapshot(d) for k, d in tiny["dirs"].items()}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _u8(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _ref_embeds(pipe, prompts, images=None):
    import torch

    kw = {} if images is None else {"image": images}
    with torch.no_grad():
        emb, mask = pipe.encode_prompt(prompt=prompts, device="cpu", **kw)
    emb = emb.numpy()
    mask = np.ones(emb.shape[:2], bool) if mask is None else mask.numpy().astype(bool)
    return [e[m] for e, m in zip(emb, mask)]


# ------------------------------------------------------------------------ prompt embeddings

@pytest.mark.parity
@pytest.mark.parametrize("n_images", [1, 2])
def test_edit_plus_prompt_embeddings_match(tiny, snaps, n_images):
    from PIL import Image

    imgs = _u8([(40, 56), (24, 64)])[:n_images]
    ref = _ref_embeds(tiny["pipes"]["edit_plus"], PROMPTS[:1], [Image.fromarray(i) for i in imgs])
    ours = QwenImagePromptEncoder(snaps["edit_plus"])(PROMPTS[:1], [imgs])
    rel = _rel(ours[0], ref[0])
    print(f"Edit-Plus prompt embeddings, {n_images} image(s): {ours[0].shape}, rel err {rel:.2e}")
    assert ours[0].shape == ref[0].shape and rel <= 1e-4


@pytest.mark.parity
def test_edit_and_t2i_prompt_embeddings_match(tiny, snaps):
    from PIL import Image

    img = _u8([(40, 56)])[0]
    ref = _ref_embeds(tiny["pipes"]["edit"], PROMPTS[:1], Image.fromarray(img))
    ours = QwenImagePromptEncoder(snaps["edit"])(PROMPTS[:1], [[img]])
    assert _rel(ours[0], ref[0]) <= 1e-4
    ref = _ref_embeds(tiny["pipes"]["t2i"], PROMPTS)  # a padded batch of two lengths
    ours = QwenImagePromptEncoder(snaps["t2i"])(PROMPTS)
    assert [o.shape for o in ours] == [r.shape for r in ref] and ours[0].shape != ours[1].shape
    assert max(_rel(o, r) for o, r in zip(ours, ref)) <= 1e-4


@pytest.mark.parity
def test_tokenizers_match_transformers(tiny, snaps):
    """vocab.json + merges.txt (tokenizer/) and tokenizer.json (processor/) give transformers' ids."""
    texts = [prompt_text("edit_plus", p, 2) for p in PROMPTS] + ["Ünïcode  spaces\n\nand 123 digits's"]
    for d in (tiny["dirs"]["t2i"] / "tokenizer", tiny["dirs"]["edit"] / "processor"):
        tok = qwen2_tokenizer(d)
        for t in texts:
            assert tok.encode(t, add_special_tokens=False).ids == tiny["tokenizer"](t).input_ids, (d, t)


def test_prompt_cache_and_release(tiny, snaps, tmp_path):
    img = _u8([(40, 56)])[0]
    enc = QwenImagePromptEncoder(snaps["edit_plus"], cache_dir=tmp_path)
    a = enc(PROMPTS, [[img], [img, img]])
    own = load_qwen_image_snapshot(tiny["dirs"]["edit_plus"])  # released below: not the shared one
    again = QwenImagePromptEncoder(own, cache_dir=tmp_path)  # a new process sees the files
    b = again(PROMPTS, [[img], [img, img]])
    assert again.stats == {"encoded": 0, "cache_hits": 2, "truncated": 0}
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    other = again([PROMPTS[0]], [[255 - img]])  # another source image is another entry
    assert again.stats["encoded"] == 1 and np.abs(other[0] - a[0]).max() > 1e-4
    again.release()
    np.testing.assert_array_equal(again(PROMPTS[:1], [[img]])[0], a[0])
    with pytest.raises(RuntimeError, match="text encoder was released"):
        again(["a new prompt"], [[img]])
    with pytest.raises(ValueError, match="has no source image"):
        enc(PROMPTS[:1])


# ------------------------------------------------------------------------ whole pipelines

@pytest.fixture(scope="module")
def pipes(snaps):
    from arr_jax.diffusion.qwen_image_pipeline import QwenImagePipeline
    from _tiny_qwen_image import COND_AREA, VAE_AREA

    return {k: QwenImagePipeline(s, vae_area=VAE_AREA, condition_area=COND_AREA) for k, s in snaps.items()}


def _reference(pipe, **kw):
    import torch

    from _tiny_qwen_image import small_areas

    with torch.no_grad(), small_areas():
        lat = pipe(output_type="latent", **kw).images.numpy()
        img = pipe(output_type="pt", **kw).images.numpy().transpose(0, 2, 3, 1)
    return lat, img


def _check(name, out, ref_lat, ref_img):
    img = np.clip(out.images / 2 + 0.5, 0, 1)
    e_lat, e_img = _rel(out.latents, ref_lat), float(np.abs(img - ref_img).max())
    print(f"{name}: latents rel err {e_lat:.2e}, image max abs err {e_img:.2e}")
    assert out.latents.shape == ref_lat.shape and img.shape == ref_img.shape
    assert e_lat <= 1e-4 and e_img <= 1e-4
    assert img.std() > 0.02  # a real image, not a constant


@pytest.mark.parity
def test_text_to_image_matches_diffusers(tiny, pipes):
    import torch

    ours = pipes["t2i"]
    space = ours.latent_space(48, 64)
    lat = np.array(ours.noise([3, 4], space))
    out = ours.sample(PROMPTS, height=48, width=64, num_steps=2, latents=lat, negative_prompt=" ",
                      true_cfg_scale=3.0)
    ref = _reference(tiny["pipes"]["t2i"], prompt=PROMPTS, negative_prompt=[" ", " "], true_cfg_scale=3.0,
                     height=48, width=64, num_inference_steps=2, latents=torch.from_numpy(lat))
    _check("Qwen-Image t2i, CFG 3", out, *ref)


@pytest.mark.parity
@pytest.mark.parametrize("cfg", [None, 4.0])
def test_edit_matches_diffusers(tiny, pipes, cfg):
    import torch
    from PIL import Image

    ours = pipes["edit"]
    src = _u8([(40, 56)], seed=3)[0]
    kw = {} if cfg is None else dict(negative_prompt=" ", true_cfg_scale=cfg)
    w, h = calculate_dimensions(ours.vae_area, 56 / 40)  # the default output size: the source's aspect
    lat = np.array(ours.noise([7], ours.latent_space(h, w)))
    out = ours.sample(PROMPTS[:1], src, num_steps=2, latents=lat, **kw)
    ref = _reference(tiny["pipes"]["edit"], image=Image.fromarray(src), prompt=PROMPTS[:1], num_inference_steps=2,
                     latents=torch.from_numpy(lat), **({"true_cfg_scale": 1.0} if cfg is None else kw))
    _check(f"Qwen-Image-Edit, CFG {cfg}", out, *ref)
    assert out.images.shape[1:3] == (h, w)


@pytest.mark.parity
@pytest.mark.parametrize("n_src", [1, 2])
def test_edit_plus_matches_diffusers(tiny, pipes, n_src):
    import torch
    from PIL import Image

    ours = pipes["edit_plus"]
    srcs = _u8([(40, 56), (64, 48)], seed=5)[:n_src]
    h, w = 48, 64
    lat = np.array(ours.noise([9], ours.latent_space(h, w)))
    out = ours.sample(PROMPTS[1:], [srcs], num_steps=2, latents=lat, height=h, width=w, negative_prompt=" ",
                      true_cfg_scale=4.0)
    ref = _reference(tiny["pipes"]["edit_plus"], image=[Image.fromarray(s) for s in srcs], prompt=PROMPTS[1:],
                     negative_prompt=" ", true_cfg_scale=4.0, height=h, width=w, num_inference_steps=2,
                     latents=torch.from_numpy(lat))
    _check(f"Qwen-Image-Edit-2509, {n_src} source(s), CFG 4", out, *ref)
    if n_src == 2:  # the second source matters
        other = ours.sample(PROMPTS[1:], [[srcs[0], 255 - srcs[1]]], num_steps=2, latents=lat, height=h, width=w)
        assert np.abs(other.latents - out.latents).max() > 1e-3


@pytest.mark.parity
@pytest.mark.parametrize("tokens", [16, 1024, 4096])
@pytest.mark.parametrize("steps", [2, 3, 50])
def test_sigmas_match_scheduler(tokens, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    from arr_jax.convert.snapshot import SchedulerConfig
    from arr_jax.diffusion.qwen_image_pipeline import qwen_sigmas
    from _tiny_qwen_image import SCHEDULER

    sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(tokens, 256, 8192, 0.5, 0.9))
    kw = {k: v for k, v in SCHEDULER.items() if k != "time_shift_type"}
    sigmas, t = qwen_sigmas(steps, tokens, SchedulerConfig(**kw))
    np.testing.assert_array_equal(sigmas, sch.sigmas.numpy())
    np.testing.assert_array_equal(t, (sch.timesteps / 1000).numpy())
    assert abs(sigmas[-2] - 0.02) < 1e-6  # stretched to shift_terminal


# ------------------------------------------------------------------------ rollout and bad inputs

@pytest.mark.parity
def test_sde_rollout_rescores_and_pairs(pipes):
    """The RPO rollout through the shared SDE code: no CFG, re-scoring a stored transition gives its
    log-prob, the two samples of a pair share x_T but not the SDE noise."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from arr_jax.diffusion.rollout import step_log_prob
    from arr_jax.diffusion.schedule import rollout_sigmas

    ours = pipes["edit_plus"]
    src = _u8([(40, 56)], seed=1)[0]
    traj, img = ours.rollout(PROMPTS[:1] * 2, jax.random.key(3), [[src], [src]], height=32, width=32, num_steps=3,
                             seeds=[5, 5])
    assert traj.latents.shape == (4, 2, 4, 16) and traj.log_probs.shape == (3, 2) and img.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(np.asarray(traj.latents[0, 0]), np.asarray(traj.latents[0, 1]))
    assert np.abs(img[0] - img[1]).max() > 1e-3
    cond, _, hws = ours.conditioning(PROMPTS[:1] * 2, [[src], [src]])
    space = ours.latent_space(32, 32, hws)
    model = nnx.merge(*nnx.split(ours.transformer))
    sig = rollout_sigmas(3, 3.0)
    out = step_log_prob(lambda x, t: space.apply(model, x, t, cond), traj.latents[1], traj.latents[2],
                        jnp.float32(sig[1]), jnp.float32(sig[2]), 0.3)
    np.testing.assert_allclose(np.asarray(out.logp), np.asarray(traj.log_probs[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parity
def test_bad_inputs_are_clear_errors(tiny, snaps):
    from arr_jax.diffusion.qwen_image_pipeline import QwenImagePipeline

    img = _u8([(32, 32)])[0]
    edit, plus = QwenImagePipeline(snaps["edit"], vae_area=None), QwenImagePipeline(snaps["edit_plus"])
    with pytest.raises(ValueError, match=r"source image size 30x32 .*not divisible by 16"):
        edit.sample(PROMPTS[:1], _u8([(30, 32)])[0], num_steps=2)
    with pytest.raises(ValueError, match=r"prompt 0 has 2 source images, but Qwen-Image-Edit takes at most 1"):
        edit.sample(PROMPTS[:1], [[img, img]], num_steps=2)
    with pytest.raises(ValueError, match=r"4 source images, but Qwen-Image-Edit-2509 takes at most 3"):
        plus.sample(PROMPTS[:1], [[img] * 4], num_steps=2)
    with pytest.raises(ValueError, match="has no source image"):
        plus.sample(PROMPTS[:1], num_steps=2)
    with pytest.raises(ValueError, match="this snapshot is text-to-image"):
        QwenImagePipeline(snaps["t2i"]).sample(PROMPTS[:1], img, num_steps=2)
    with pytest.raises(ValueError, match=r"33x32 .*not divisible by 16"):
        edit.latent_space(33, 32)
    with pytest.raises(ValueError, match="num_steps=1 cannot be stretched"):
        edit.sample(PROMPTS[:1], img, num_steps=1)


def test_snapshot_of_another_model_is_named(tiny, tmp_path):
    from _tiny_flux import build_tiny_pipeline

    flux_dir = tmp_path / "flux"
    build_tiny_pipeline(flux_dir)
    with pytest.raises(SnapshotError, match="FluxPipeline' is not a Qwen-Image pipeline"):
        load_qwen_image_snapshot(flux_dir)
    src = tiny["dirs"]["edit_plus"]
    with pytest.raises(SnapshotError, match="holds a Qwen-Image edit_plus pipeline, but t2i was asked for"):
        load_qwen_image_snapshot(src, expect="t2i")
    d = tmp_path / "swapped"
    shutil.copytree(src, d)
    idx = json.loads((d / "model_index.json").read_text())
    (d / "model_index.json").write_text(json.dumps({**idx, "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(SnapshotError, match="'vae' is diffusers AutoencoderKL.*not a Qwen-Image snapshot"):
        read_qwen_model_index(d)
    shutil.rmtree(d / "processor")
    (d / "model_index.json").write_text(json.dumps(idx))
    with pytest.raises(FileNotFoundError, match="missing the processor/ folder"):
        load_qwen_image_snapshot(d)
