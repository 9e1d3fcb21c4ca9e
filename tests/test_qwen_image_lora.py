"""LoRA on the Qwen-Image transformer in the diffusers / PEFT naming: an adapter we export loads into
diffusers' QwenImageEditPlusPipeline (``load_lora_weights``) and reproduces our images; import
restores it exactly."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from arr_jax.convert.lora_peft import adapted_linears, load_peft_lora, lora_config_from_file, save_peft_lora
from arr_jax.nn.lora import LoRAConfig

PROMPT = ["make the sky green"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from _tiny_qwen_image import build_tiny, save_snapshot

    t = build_tiny()
    t["dir"] = save_snapshot(t, "edit_plus", tmp_path_factory.mktemp("qwen_lora"))
    return t


def _randomise(model, seed=0):
    key = jax.random.key(seed)
    for i, (name, lin) in enumerate(sorted(adapted_linears(model).items())):
        b = lin.lora_b.get_value()
        lin.lora_b.set_value(0.3 * jax.random.normal(jax.random.fold_in(key, i), b.shape, b.dtype))


@pytest.mark.parity
@pytest.mark.parametrize("alpha_format", ["bake", "metadata"])
def test_exported_lora_reproduces_our_output_in_diffusers(tiny, tmp_path, alpha_format):
    import torch
    from PIL import Image

    from arr_jax.diffusion.qwen_image_pipeline import QwenImagePipeline
    from _tiny_qwen_image import COND_AREA, VAE_AREA, small_areas

    ours = QwenImagePipeline.from_pretrained(tiny["dir"], vae_area=VAE_AREA, condition_area=COND_AREA,
                                             lora=LoRAConfig(rank=4, alpha=8.0))
    names = sorted(adapted_linears(ours.transformer))
    assert len(names) == 2 * 8 and "transformer_blocks.1.attn.to_add_out" in names
    _randomise(ours.transformer)
    src = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    lat = np.array(ours.noise([1], ours.latent_space(32, 48)))
    out = ours.sample(PROMPT, [[src]], num_steps=2, latents=lat, height=32, width=48)
    base = QwenImagePipeline.from_pretrained(tiny["dir"], vae_area=VAE_AREA, condition_area=COND_AREA)
    base_out = base.sample(PROMPT, [[src]], num_steps=2, latents=lat, height=32, width=48)
    assert np.abs(out.latents - base_out.latents).max() > 1e-3  # the adapter matters

    path = save_peft_lora(ours.transformer, tmp_path / f"lora_{alpha_format}", alpha_format=alpha_format)
    pipe = tiny["pipes"]["edit_plus"]
    pipe.load_lora_weights(str(path.parent), adapter_name=f"ours_{alpha_format}")
    try:
        with torch.no_grad(), small_areas():
            ref = pipe(image=[Image.fromarray(src)], prompt=PROMPT, height=32, width=48, num_inference_steps=2,
                       latents=torch.from_numpy(lat), true_cfg_scale=1.0, output_type="latent").images.numpy()
    finally:
        pipe.unload_lora_weights()
    rel = np.linalg.norm(out.latents - ref) / np.linalg.norm(ref)
    print(f"LoRA ({alpha_format}) in diffusers: latents rel err {rel:.2e}")
    assert rel <= 1e-4

    # and back: a fresh model with the file's config reproduces the adapters exactly
    cfg = lora_config_from_file(path)
    assert cfg.rank == 4 and cfg.alpha == pytest.approx(4 * (2.0 if alpha_format == "metadata" else 1.0))
    again = QwenImagePipeline.from_pretrained(tiny["dir"], vae_area=VAE_AREA, condition_area=COND_AREA, lora=cfg)
    load_peft_lora(again.transformer, path)
    back = again.sample(PROMPT, [[src]], num_steps=2, latents=lat, height=32, width=48)
    np.testing.assert_allclose(back.latents, out.latents, rtol=1e-5, atol=1e-5)
