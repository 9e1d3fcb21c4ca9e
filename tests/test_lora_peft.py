"""LoRA export to / import from the diffusers-PEFT safetensors layout."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arr_jax.convert.lora_peft import (adapted_linears, load_peft_lora, lora_config_from_file, lora_state_dict,
                                       save_peft_lora)
from arr_jax.models.flux import FluxConfig, FluxTransformer
from arr_jax.nn.lora import LoRAConfig

FORMATS = ["bake", "metadata", "keys"]


def _randomize(model, seed=0, scale=0.1):
    """Nonzero adapters (fresh ones have B = 0)."""
    rng = np.random.default_rng(seed)
    for lin in adapted_linears(model).values():
        for v in (lin.lora_a, lin.lora_b):
            v.set_value(jnp.asarray(scale * rng.standard_normal(v.get_value().shape), jnp.float32))


def _inputs(n=16, channels=16, txt_dim=32, pooled=16, b=2, length=5, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.stack(np.meshgrid(np.zeros(1), np.arange(4), np.arange(n // 4), indexing="ij"), -1).reshape(n, 3)
    return dict(img=rng.standard_normal((b, n, channels), np.float32), txt=rng.standard_normal((b, length, txt_dim), np.float32),
                pooled=rng.standard_normal((b, pooled), np.float32), timestep=np.array([0.7, 0.2], np.float32),
                img_ids=ids.astype(np.float32), txt_ids=np.zeros((length, 3), np.float32),
                guidance=np.array([3.5, 2.0], np.float32))


def _ours(model, x):
    """Jitted forward (eager op-by-op dispatch of a whole Flux costs seconds per new shape)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_jit_forward(graphdef)(state, {k: jnp.asarray(v) for k, v in x.items()}))


_CACHE = {}


def _jit_forward(graphdef):
    if graphdef not in _CACHE:
        _CACHE[graphdef] = jax.jit(lambda st, x: nnx.merge(graphdef, st)(**x))
    return _CACHE[graphdef]


def _tiny(lora):
    return FluxTransformer(FluxConfig.tiny(lora=lora), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("fmt", FORMATS)
def test_roundtrip_between_alphas(tmp_path, fmt):
    """Export with alpha/r = 4, import into a model with alpha/r = 0.5: same outputs."""
    src = _tiny(LoRAConfig(rank=4, alpha=16.0))
    _randomize(src)
    x = _inputs()
    want = _ours(src, x)
    path = save_peft_lora(src, tmp_path / "lora.safetensors", alpha_format=fmt)
    cfg = lora_config_from_file(path)
    assert cfg.rank == 4 and cfg.scale == pytest.approx(1.0 if fmt == "bake" else 4.0)
    dst = _tiny(LoRAConfig(rank=4, alpha=2.0))
    assert np.abs(_ours(dst, x) - want).max() > 1e-3  # adapters matter
    names = load_peft_lora(dst, path)
    assert len(names) == len(adapted_linears(src)) == 2 * 8 + 2 * 3
    np.testing.assert_allclose(_ours(dst, x), want, rtol=1e-5, atol=1e-5)


def test_names_shapes_and_metadata():
    model = _tiny(LoRAConfig(rank=4, alpha=8.0))
    _randomize(model)
    tensors, meta = lora_state_dict(model, alpha_format="metadata")
    a = tensors["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    b = tensors["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    lin = model.transformer_blocks[0].attn.to_q
    assert a.shape == (4, lin.in_features) and b.shape == (lin.out_features, 4)
    np.testing.assert_array_equal(b, np.asarray(lin.lora_b.get_value()).T)  # unscaled in this format
    assert "transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight" in tensors
    assert "transformer.single_transformer_blocks.1.attn.to_k.lora_B.weight" in tensors
    m = json.loads(meta["lora_adapter_metadata"])
    assert m["transformer.r"] == 4 and m["transformer.lora_alpha"] == 8.0
    baked, meta_b = lora_state_dict(model)
    np.testing.assert_allclose(baked["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"], 2.0 * b)
    assert "lora_adapter_metadata" not in meta_b


def test_import_errors(tmp_path):
    src = _tiny(LoRAConfig(rank=4, alpha=4.0))
    _randomize(src)
    path = save_peft_lora(src, tmp_path)  # a directory -> pytorch_lora_weights.safetensors
    assert path.name == "pytorch_lora_weights.safetensors"
    with pytest.raises(ValueError, match=r"lora_A .*\(4, 64\).*\(64, 2\)|has A"):
        load_peft_lora(_tiny(LoRAConfig(rank=2, alpha=2.0)), path)
    few = _tiny(LoRAConfig(rank=4, alpha=4.0, targets=("attn.to_q",)))
    with pytest.raises(ValueError, match=r"no adapted Linear in the model: \['single_transformer_blocks\.0\.attn\.to_k'"):
        load_peft_lora(few, path)
    more = _tiny(LoRAConfig(rank=4, alpha=4.0, targets=("attn.to_q", "ff.net.2")))
    only_q = save_peft_lora(_tiny(LoRAConfig(rank=4, alpha=4.0, targets=("attn.to_q",))), tmp_path / "q.safetensors")
    with pytest.raises(ValueError, match=r"no weights for the model's adapters \['transformer_blocks\.0\.ff\.net\.2'"):
        load_peft_lora(more, only_q)
    _randomize(more)
    load_peft_lora(more, only_q, strict=False)
    assert float(jnp.abs(more.transformer_blocks[0].ff.net[2].lora_b.get_value()).max()) == 0.0
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora_state_dict(_tiny(None))


@pytest.fixture(scope="module")
def tiny_diffusers(tmp_path_factory):
    pytest.importorskip("peft")
    pytest.importorskip("diffusers")
    from _tiny_flux import build_tiny_pipeline

    path = tmp_path_factory.mktemp("lora_snapshot")
    return build_tiny_pipeline(path), path


@pytest.mark.parity
@pytest.mark.parametrize("fmt", FORMATS)
def test_diffusers_load_lora_weights_matches(tiny_diffusers, tmp_path, fmt):
    """Our LoRA, exported and loaded with ``FluxPipeline.load_lora_weights``, gives our output."""
    import torch

    from arr_jax.convert.flux import load_flux_transformer

    pipe, snap = tiny_diffusers
    ours = load_flux_transformer(snap / "transformer", lora=LoRAConfig(rank=4, alpha=8.0))
    _randomize(ours, seed=1, scale=0.2)
    x = _inputs(channels=64, pooled=16, txt_dim=32)
    want = _ours(ours, x)
    base = _ours(load_flux_transformer(snap / "transformer"), x)
    path = save_peft_lora(ours, tmp_path / f"{fmt}.safetensors", alpha_format=fmt)
    pipe.load_lora_weights(str(path), adapter_name=f"ours_{fmt}")
    try:
        with torch.no_grad():
            got = pipe.transformer(hidden_states=torch.from_numpy(x["img"]), encoder_hidden_states=torch.from_numpy(x["txt"]),
                                   pooled_projections=torch.from_numpy(x["pooled"]),
                                   timestep=torch.from_numpy(x["timestep"]), img_ids=torch.from_numpy(x["img_ids"]),
                                   txt_ids=torch.from_numpy(x["txt_ids"]), guidance=torch.from_numpy(x["guidance"])
                                   ).sample.numpy()
    finally:
        pipe.unload_lora_weights()
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"{fmt}: LoRA effect {np.abs(want - base).max():.2e}, diffusers vs ours max rel err {err:.2e}")
    assert np.abs(want - base).max() > 1e-2  # the adapters change the output
    assert err <= 1e-5
