"""Qwen-Image VAE on still images: encode / decode parity with diffusers' AutoencoderKLQwenImage,
latent normalisation, checkpoint validation."""
from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from arr_jax.convert.qwen_image_vae import load_qwen_image_vae, qwen_vae_key_map
from arr_jax.convert.safetensors_io import CheckpointFormatError

# base 8, three downsamplings (f = 8), 4 latent channels
TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
            temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
            latents_std=[1.5, 0.7, 2.0, 1.1])
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLQwenImage(**TINY).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("gamma") else p + 0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("qwen_vae")
    model.save_pretrained(path)
    return path, model


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parity
def test_encode_decode_match_diffusers(vae):
    import torch

    path, ref = vae
    ours = load_qwen_image_vae(path)
    assert ours.downsample_factor == 8
    img = np.random.default_rng(0).uniform(-1, 1, (2, 48, 64, 3)).astype(np.float32)  # non-square
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(img.transpose(0, 3, 1, 2))[:, :, None]).latent_dist
        ref_mean = dist.mean[:, :, 0].numpy().transpose(0, 2, 3, 1)
        ref_logvar = dist.logvar[:, :, 0].numpy().transpose(0, 2, 3, 1)
    mean, logvar = ours.encode_moments(jnp.asarray(img))
    e_mean, e_logvar = _rel(mean, ref_mean), _rel(logvar, ref_logvar)
    z = np.random.default_rng(1).standard_normal((2, 6, 8, 4)).astype(np.float32)
    with torch.no_grad():
        ref_img = ref.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))[:, :, None]).sample[:, :, 0].numpy()
    out = np.asarray(ours.decode(jnp.asarray(z)))
    e_dec = _rel(out, ref_img.transpose(0, 2, 3, 1))
    print(f"VAE encode mean rel {e_mean:.2e}, logvar rel {e_logvar:.2e}; decode rel {e_dec:.2e}, "
          f"max abs {np.abs(out - ref_img.transpose(0, 2, 3, 1)).max():.2e}")
    assert mean.shape == (2, 6, 8, 4) and out.shape == (2, 48, 64, 3)
    assert e_mean <= 1e-5 and e_logvar <= 1e-5 and e_dec <= 1e-5
    assert np.abs(out).max() <= 1.0


@pytest.mark.parity
def test_latent_normalisation_matches_pipeline(vae):
    import torch
    from diffusers import QwenImageEditPipeline

    path, ref = vae
    ours = load_qwen_image_vae(path)
    img = np.random.default_rng(2).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    pipe = QwenImageEditPipeline.__new__(QwenImageEditPipeline)  # only _encode_vae_image's math is used
    pipe.vae, pipe.latent_channels = ref, 4
    with torch.no_grad():
        want = pipe._encode_vae_image(torch.from_numpy(img.transpose(0, 3, 1, 2))[:, :, None], None)
    got = np.asarray(ours.scale_latents(ours.encode(jnp.asarray(img))))
    assert _rel(got, want[:, :, 0].numpy().transpose(0, 2, 3, 1)) <= 1e-5
    np.testing.assert_allclose(np.asarray(ours.unscale_latents(ours.scale_latents(jnp.asarray(got)))), got,
                               rtol=1e-6, atol=1e-6)


def test_key_map():
    assert qwen_vae_key_map("encoder.down_blocks.2.time_conv.weight") is None
    assert qwen_vae_key_map("decoder.up_blocks.0.upsamplers.0.resample.1.weight")[0] == (
        "decoder", "up_blocks", 0, "upsamplers", 0, "resample", 1, "kernel")
    path, fn = qwen_vae_key_map("encoder.norm_out.gamma")
    assert path == ("encoder", "norm_out", "gamma") and fn(np.ones((5, 1, 1, 1))).shape == (5,)
    assert qwen_vae_key_map("quant_conv.weight")[1](np.zeros((8, 8, 1, 1, 1))).shape == (1, 1, 8, 8)


@pytest.mark.parity
def test_bad_vae_checkpoints(vae, tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _ = vae
    d = tmp_path / "broken"
    shutil.copytree(path, d)
    sd = load_file(str(d / WEIGHTS))
    del sd["decoder.conv_out.bias"]
    sd["encoder.conv_in.weight"] = sd["encoder.conv_in.weight"][:4]
    save_file(sd, str(d / WEIGHTS))
    with pytest.raises(CheckpointFormatError) as e:
        load_qwen_image_vae(d)
    assert "decoder.conv_out.bias" in str(e.value) and "encoder.conv_in.weight" in str(e.value)
    d2 = tmp_path / "flux_vae"
    shutil.copytree(path, d2)
    cfg = json.loads((d2 / "config.json").read_text())
    (d2 / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="config.json: expected _class_name 'AutoencoderKLQwenImage'"):
        load_qwen_image_vae(d2)
    (d2 / "config.json").write_text(json.dumps({**cfg, "attn_scales": [0.5]}))
    with pytest.raises(ValueError, match=r"config.json: attn_scales=\[0.5\] is not supported"):
        load_qwen_image_vae(d2)
