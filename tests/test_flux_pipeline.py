"""The FLUX.1 / FLUX.1-Kontext pipeline: parity with diffusers on a tiny random snapshot,
sigma schedule, packing, prompt cache, bad inputs, sharded rollout, the sample entry point."""
from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from arr_jax.convert.snapshot import SnapshotError, TextTokenizer, load_flux_snapshot, read_model_index
from arr_jax.diffusion.flux_pipeline import (FluxLatentSpace, FluxPipeline, PromptTruncationWarning, check_image_size,
                                             flux_sigmas, pack_latents, unpack_latents)
from _tiny_flux import CLIP_MAX, IMAGE, SCHEDULER, T5_MAX

PROMPTS = ["a red cat", "A big Dog, 2 cats!"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny diffusers FluxPipeline + FluxKontextPipeline (same weights), saved as two snapshots."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import FluxKontextPipeline

    from _tiny_flux import build_tiny_pipeline, save_snapshot

    t2i_dir = tmp_path_factory.mktemp("flux_snapshot")
    pipe = build_tiny_pipeline(t2i_dir)
    kpipe = FluxKontextPipeline(**pipe.components)
    kpipe.set_progress_bar_config(disable=True)
    k_dir = save_snapshot(kpipe, tmp_path_factory.mktemp("kontext_snapshot"))
    return {"pipe": pipe, "kpipe": kpipe, "t2i_dir": t2i_dir, "kontext_dir": k_dir}


@pytest.fixture(scope="module")
def ours(tiny):
    return FluxPipeline.from_pretrained(tiny["t2i_dir"], t5_max_length=T5_MAX)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------------ parity with diffusers

@pytest.mark.parity
def test_tokenizers_match_transformers(tiny, ours):
    prompts = PROMPTS + ["", "cat-dog's  'red'   zebra 42", "x " * 40, "A big blue dog on the photo, 2 cats!"]
    for tok, ref, n in ((ours.snap.clip_tokenizer, tiny["pipe"].tokenizer, CLIP_MAX),
                        (ours.snap.t5_tokenizer, tiny["pipe"].tokenizer_2, T5_MAX)):
        ids, lengths = tok(prompts)
        want = ref(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="np").input_ids
        np.testing.assert_array_equal(ids, want)
        full = [len(x) for x in ref(prompts).input_ids]
        np.testing.assert_array_equal(lengths, full)


@pytest.mark.parity
def test_text_to_image_matches_diffusers(tiny, ours):
    import torch

    space = ours.latent_space(IMAGE, IMAGE)
    lat = np.array(ours.noise([3, 4], space))
    out = ours.sample(PROMPTS, height=IMAGE, width=IMAGE, num_steps=3, guidance=3.5, latents=lat)
    kw = dict(prompt=PROMPTS, height=IMAGE, width=IMAGE, num_inference_steps=3, guidance_scale=3.5,
              max_sequence_length=T5_MAX, latents=torch.from_numpy(lat))
    with torch.no_grad():
        ref_lat = tiny["pipe"](output_type="latent", **kw).images.numpy()
        ref_img = tiny["pipe"](output_type="pt", **kw).images.numpy().transpose(0, 2, 3, 1)
    img = np.clip(out.images / 2 + 0.5, 0, 1)
    err_lat, err_img = np.abs(out.latents - ref_lat).max(), np.abs(img - ref_img).max()
    print(f"t2i: latents max err {err_lat:.2e} (rel {_rel(out.latents, ref_lat):.2e}), image max err {err_img:.2e}")
    assert out.images.shape == (2, IMAGE, IMAGE, 3)
    assert _rel(out.latents, ref_lat) <= 1e-5 and err_img <= 1e-4
    assert img.std() > 0.05  # a real image, not a constant


@pytest.mark.parity
def test_kontext_matches_diffusers(tiny):
    import torch
    from PIL import Image

    ours = FluxPipeline.from_pretrained(tiny["kontext_dir"], t5_max_length=T5_MAX)
    assert ours.kind == "kontext"
    src = np.random.default_rng(0).integers(0, 256, (2, IMAGE, IMAGE + 16, 3), dtype=np.uint8)
    space = ours.latent_space(IMAGE, IMAGE, src.shape[1:3])
    assert space.img_ids()[space.num_tokens:, 0].min() == 1  # source tokens: first id channel 1
    lat = np.array(ours.noise([0, 1], space))
    out = ours.sample(PROMPTS, num_steps=3, guidance=2.5, latents=lat, sources=src, height=IMAGE, width=IMAGE)
    kw = dict(image=[Image.fromarray(s) for s in src], prompt=PROMPTS, height=IMAGE, width=IMAGE,
              num_inference_steps=3, guidance_scale=2.5, max_sequence_length=T5_MAX, latents=torch.from_numpy(lat),
              max_area=IMAGE * IMAGE, _auto_resize=False)
    with torch.no_grad():
        ref_lat = tiny["kpipe"](output_type="latent", **kw).images.numpy()
        ref_img = tiny["kpipe"](output_type="pt", **kw).images.numpy().transpose(0, 2, 3, 1)
    img = np.clip(out.images / 2 + 0.5, 0, 1)
    err_img = np.abs(img - ref_img).max()
    print(f"kontext: latents rel err {_rel(out.latents, ref_lat):.2e}, image max err {err_img:.2e}")
    assert _rel(out.latents, ref_lat) <= 1e-5 and err_img <= 1e-4
    # the source matters: another source image gives another result
    other = ours.sample(PROMPTS, num_steps=3, guidance=2.5, latents=lat, sources=255 - src, height=IMAGE,
                        width=IMAGE)
    assert np.abs(other.latents - out.latents).max() > 1e-3


@pytest.mark.parity
@pytest.mark.parametrize("tokens", [64, 1024, 4096, 6000])
@pytest.mark.parametrize("steps", [1, 3, 30])
def test_sigmas_match_scheduler(tokens, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from arr_jax.convert.snapshot import SchedulerConfig

    sch = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(tokens))
    sigmas, t = flux_sigmas(steps, tokens, SchedulerConfig(**SCHEDULER))
    np.testing.assert_array_equal(sigmas, sch.sigmas.numpy())
    np.testing.assert_array_equal(t, (sch.timesteps / 1000).numpy())


@pytest.mark.parity
def test_packing_matches_diffusers():
    import torch
    from diffusers import FluxPipeline as Ref

    z = np.random.default_rng(0).standard_normal((2, 16, 6, 8)).astype(np.float32)  # (B, C, h, w)
    ref = Ref._pack_latents(torch.from_numpy(z), 2, 16, 6, 8).numpy()
    ours = np.asarray(pack_latents(z.transpose(0, 2, 3, 1)))
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(np.asarray(unpack_latents(ours, 6, 8)), z.transpose(0, 2, 3, 1))
    ids = Ref._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(FluxLatentSpace(48, 64, vae_factor=8).img_ids(), ids)


# ------------------------------------------------------------------------ cache and bad inputs

@pytest.mark.parity
def test_prompt_cache_on_disk(tiny, ours, tmp_path):
    first = FluxPipeline(ours.snap, cache_dir=tmp_path, encode_batch=2)
    a = first.encode_prompts(PROMPTS + PROMPTS[:1])
    assert first.stats["encoded"] == 2 and first.stats["cache_hits"] == 1
    second = FluxPipeline(ours.snap, cache_dir=tmp_path, encode_batch=2)  # a fresh process would see the files
    b = second.encode_prompts(PROMPTS)
    assert second.stats["encoded"] == 0 and second.stats["cache_hits"] == 2
    np.testing.assert_array_equal(a["txt"][:2], b["txt"])
    np.testing.assert_array_equal(a["pooled"][:2], b["pooled"])
    assert len(list(tmp_path.rglob("*.npz"))) == 2
    # another tokenizer limit -> another fingerprint -> no stale hits
    snap = load_flux_snapshot(tiny["t2i_dir"], t5_max_length=8)
    third = FluxPipeline(snap, cache_dir=tmp_path)
    c = third.encode_prompts(PROMPTS[:1])
    assert third.stats["encoded"] == 1 and c["txt"].shape[1] == 8
    third.release_text_encoders()  # cached prompts still work, new ones say why they cannot
    np.testing.assert_array_equal(third.encode_prompts(PROMPTS[:1])["txt"], c["txt"])
    with pytest.raises(RuntimeError, match="not in the embedding cache and the text encoders were released"):
        third.encode_prompts(["a new prompt"])


@pytest.mark.parity
def test_long_prompt_truncated_with_warning(ours):
    long = "a red cat on the blue dog " * 6
    before = dict(ours.stats)
    with pytest.warns(PromptTruncationWarning) as record:
        emb = ours.encode_prompts([long, "a dog"])
    messages = " | ".join(str(w.message) for w in record)
    assert "T5 limit of 16 tokens" in messages and "CLIP limit of 16 tokens" in messages
    assert ours.stats["t5_truncated"] == before["t5_truncated"] + 1
    assert ours.stats["clip_truncated"] == before["clip_truncated"] + 1
    assert emb["txt"].shape == (2, T5_MAX, 32)


@pytest.mark.parity
def test_bad_image_sizes(tiny, ours):
    with pytest.raises(ValueError, match=r"33x32 .*not divisible by 4"):
        ours.latent_space(33, 32)
    with pytest.raises(ValueError, match="source images given"):
        ours.sample(PROMPTS[:1], sources=np.zeros((1, 32, 32, 3), np.uint8))
    kontext = FluxPipeline.from_pretrained(tiny["kontext_dir"], t5_max_length=T5_MAX)
    with pytest.raises(ValueError, match=r"Kontext source image size 30x32"):
        kontext.sample(PROMPTS[:1], sources=np.zeros((1, 30, 32, 3), np.uint8), num_steps=1)
    with pytest.raises(ValueError, match="needs source images"):
        kontext.sample(PROMPTS[:1], height=32, width=32, num_steps=1)
    with pytest.raises(ValueError, match=r"1000x1001 .*not divisible by 16.*e\.g\. to 992x992"):
        check_image_size(1000, 1001, 16)


@pytest.mark.parity
def test_kontext_source_layouts(tiny):
    """RGBA and grey source arrays are converted by the one image conversion (RGBA over white);
    a (2, H, W) array is rejected with the expected layout instead of read as one 2xH image."""
    from PIL import Image

    kontext = FluxPipeline.from_pretrained(tiny["kontext_dir"], t5_max_length=T5_MAX)
    rng = np.random.default_rng(4)
    rgba = rng.integers(0, 256, (1, IMAGE, IMAGE, 4), dtype=np.uint8)
    on_white = np.asarray(Image.alpha_composite(Image.new("RGBA", (IMAGE, IMAGE), (255, 255, 255, 255)),
                                                Image.fromarray(rgba[0], "RGBA")).convert("RGB"))[None]
    grey = rgba[0, ..., 0]
    kw = dict(num_steps=1, latents=np.array(kontext.noise([0], kontext.latent_space(IMAGE, IMAGE, (IMAGE, IMAGE)))))
    a = kontext.sample(PROMPTS[:1], sources=rgba, **kw)
    b = kontext.sample(PROMPTS[:1], sources=on_white, **kw)
    np.testing.assert_array_equal(a.latents, b.latents)
    assert a.images.shape == (1, IMAGE, IMAGE, 3)
    g = kontext.sample(PROMPTS[:1], sources=grey, **kw)
    np.testing.assert_array_equal(g.latents, kontext.sample(PROMPTS[:1], sources=np.repeat(grey[None, ..., None], 3, -1),
                                                            **kw).latents)
    np.testing.assert_array_equal(kontext.encode_sources(rgba), kontext.encode_sources(on_white))
    with pytest.raises(ValueError, match=r"Kontext source images: expected an array \(B, H, W, 3\).*\(2, 32, 32\)"):
        kontext.sample(PROMPTS, sources=np.zeros((2, 32, 32), np.uint8), num_steps=1)
    with pytest.raises(ValueError, match=r"source_latents must be packed latents \(B, M, C\)"):
        kontext.conditioning(PROMPTS[:1], source_latents=np.zeros((4, 4)))


def _copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return dst


@pytest.mark.parity
def test_bad_snapshots_name_the_problem(tiny, tmp_path):
    src = tiny["t2i_dir"]

    def index_edit(**changes):
        def edit(d):
            idx = json.loads((d / "model_index.json").read_text())
            idx.update(changes)
            (d / "model_index.json").write_text(json.dumps(idx))
        return edit

    cases = [
        (lambda d: (d / "tokenizer_2" / "tokenizer.json").unlink(), FileNotFoundError, r"tokenizer_2/tokenizer\.json"),
        (lambda d: (d / "tokenizer" / "merges.txt").unlink(), FileNotFoundError, r"merges\.txt"),
        (lambda d: shutil.rmtree(d / "vae"), FileNotFoundError, r"missing the vae/ folder"),
        (lambda d: (d / "model_index.json").unlink(), FileNotFoundError, r"model_index\.json is missing"),
        (lambda d: (d / "transformer" / "diffusion_pytorch_model.safetensors").unlink(), FileNotFoundError,
         r"no \*\.safetensors files in .*transformer"),
        (index_edit(_class_name="StableDiffusion3Pipeline"), SnapshotError, "StableDiffusion3Pipeline.*not a FLUX"),
        (index_edit(transformer=["diffusers", "SD3Transformer2DModel"]), SnapshotError,
         r"'transformer' is diffusers SD3Transformer2DModel"),
    ]
    for i, (edit, exc, msg) in enumerate(cases):
        d = _copy(src, tmp_path / f"case{i}", edit)
        with pytest.raises(exc, match=msg):
            load_flux_snapshot(d, t5_max_length=T5_MAX)
    # a FluxPipeline snapshot asked for as Kontext
    with pytest.raises(SnapshotError, match="holds a flux pipeline, but a kontext"):
        load_flux_snapshot(src, expect="kontext")
    kind, _ = read_model_index(src)
    assert kind == "flux"


def test_tokenizer_kind_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        TextTokenizer.from_dir(tmp_path, "bert")


# ------------------------------------------------------------------------ sharded rollout

@pytest.mark.parity
@pytest.mark.slow
def test_sharded_rollout_matches_unsharded(tiny, ours, tmp_path):
    from arr_jax.sharding import make_mesh, make_rules

    prompts = ["a red cat", "a dog", "a big blue dog", "the cat"]
    key = jax.random.key(7)
    kw = dict(height=IMAGE, width=IMAGE, num_steps=3, eta=0.3, seeds=[0, 0, 1, 1])
    ref_traj, ref_img = FluxPipeline(ours.snap, cache_dir=tmp_path).rollout(prompts, key, **kw)
    rules = make_rules(make_mesh(data=2, fsdp=2, tensor=2))
    # the same embeddings come from the disk cache: only the transformer and VAE run sharded
    sharded = FluxPipeline.from_pretrained(tiny["t2i_dir"], t5_max_length=T5_MAX, rules=rules, cache_dir=tmp_path)
    k = sharded.transformer.transformer_blocks[0].attn.to_q.kernel.get_value()
    assert k.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    traj, img = sharded.rollout(prompts, key, **kw)
    jax.block_until_ready(traj)
    assert sharded.stats["encoded"] == 0
    assert traj.latents.sharding.spec[1] == ("data", "fsdp")
    assert traj.latents.shape == (4, 4, 64, 64) and traj.log_probs.shape == (3, 4)
    np.testing.assert_allclose(np.asarray(traj.latents), np.asarray(ref_traj.latents), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(traj.log_probs), np.asarray(ref_traj.log_probs), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(img, ref_img, atol=1e-4)
    # shared initial noise per pair, different SDE noise: the pair's images differ
    assert np.abs(ref_img[0] - ref_img[1]).max() > 1e-3


# ------------------------------------------------------------------------ entry point

@pytest.mark.parity
@pytest.mark.slow
def test_sample_entry_point(tiny, tmp_path):
    import importlib.util
    from pathlib import Path

    from arr_jax import sample

    spec = importlib.util.spec_from_file_location(
        "flux_dev_t2i", Path(__file__).parents[1] / "configs" / "flux_dev_t2i.py")
    cfg_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg_mod)
    cfg = cfg_mod.get_config("tiny")
    (tmp_path / "prompts.txt").write_text("a red cat\n\na blue dog\nthe cat\n")
    cfg.model_dir, cfg.prompts_file, cfg.outdir = str(tiny["t2i_dir"]), str(tmp_path / "prompts.txt"), str(tmp_path / "out")
    cfg.cache_dir = str(tmp_path / "cache")
    written = sample.run(cfg)
    names = sorted(p.name for p in written)
    assert names == ["00000_s0.png", "00001_s0.png", "00002_s0.png", "grid.png"]
    out = tmp_path / "out" / "base_ode2_seed0"  # each run in its own folder, named by what it is
    assert {p.parent for p in written} == {out}
    index = json.loads((out / "samples.json").read_text())
    assert index["images"]["00001_s0.png"]["prompt"] == "a blue dog" and index["settings"]["num_steps"] == 2
    from PIL import Image

    assert np.asarray(Image.open(out / "grid.png")).shape == (64, 64, 3)


# ------------------------------------------------------------------------ text encoders

@pytest.mark.parity
def test_over_limit_prompts_embed_as_diffusers(tiny, ours):
    """Prompts past the CLIP and T5 token limits are cut as diffusers cuts them: the T5 sequence and the CLIP
    pooled embedding equal ``FluxPipeline.encode_prompt``'s (which truncates both)."""
    import torch

    prompts = ["a red cat on the blue dog " * 6, "the big photo of a cat and a dog on the red and blue " * 3]
    with pytest.warns(PromptTruncationWarning):
        emb = ours.encode_prompts(prompts)   # prompts no other test encodes: not cached
    with torch.no_grad():
        txt, pooled, _ = tiny["pipe"].encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=T5_MAX)
    assert emb["txt"].shape == tuple(txt.shape) == (2, T5_MAX, 32)
    assert _rel(emb["txt"], txt.numpy()) <= 1e-5 and _rel(emb["pooled"], pooled.numpy()) <= 1e-5
