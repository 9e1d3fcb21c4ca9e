"""Parity of our FLUX VAE with a tiny random diffusers AutoencoderKL (float32)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arr_jax.convert.vae import load_vae, read_vae_config

pytestmark = pytest.mark.parity


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A FLUX-like AutoencoderKL: 16 latent channels, no quant convs, shift/scale factors, 2 blocks."""
    import torch
    from diffusers import AutoencoderKL as TorchVAE

    torch.manual_seed(0)
    ref = TorchVAE(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, norm_num_groups=4, layers_per_block=1,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
    ).eval()
    # Random init leaves GroupNorm affine at (1, 0); perturb so the test sees the norm parameters.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(path)
    return ref, path


def test_vae_encode_decode_parity(tiny_vae):
    import torch

    ref, path = tiny_vae
    model = load_vae(path, jnp.float32)
    assert model.config.latent_channels == 16 and model.config.shift_factor == pytest.approx(0.1159)

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)  # NHWC
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
        mean_ref = post.mean.permute(0, 2, 3, 1).numpy()
        logvar_ref = post.logvar.permute(0, 2, 3, 1).numpy()
    mean, logvar = jax.jit(model.encode_moments)(jnp.asarray(images))
    assert mean.shape == (2, 8, 8, 16)
    err_mean, err_logvar = _rel(mean, mean_ref), _rel(logvar, logvar_ref)
    print(f"VAE encode mean rel err {err_mean:.2e}, logvar {err_logvar:.2e}")
    assert err_mean < 1e-5 and err_logvar < 1e-5

    key = jax.random.key(1)
    sample = model.encode(jnp.asarray(images), key)
    eps = jax.random.normal(key, mean.shape)
    np.testing.assert_allclose(sample, mean + jnp.exp(0.5 * logvar) * eps, rtol=1e-6, atol=1e-6)

    z = rng.normal(size=(2, 8, 8, 16)).astype(np.float32)
    with torch.no_grad():
        dec_ref = ref.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    dec = jax.jit(model.decode)(jnp.asarray(z))
    assert dec.shape == (2, 16, 16, 3)
    err_dec = _rel(dec, dec_ref)
    print(f"VAE decode rel err {err_dec:.2e}")
    assert err_dec < 1e-5

    zs = model.scale_latents(mean)
    np.testing.assert_allclose(zs, (mean - 0.1159) * 0.3611, rtol=1e-6)
    np.testing.assert_allclose(model.unscale_latents(zs), mean, rtol=1e-5, atol=1e-6)


def test_vae_loader_errors(tiny_vae, tmp_path):
    _, path = tiny_vae
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, _class_name="UNet2DModel")))
    with pytest.raises(ValueError, match="UNet2DModel"):
        read_vae_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, use_quant_conv=True)))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(
        (path / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="quant_conv"):  # the checkpoint lacks quant_conv weights
        load_vae(tmp_path)
