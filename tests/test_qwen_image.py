"""Qwen-Image transformer: parity with diffusers (text-to-image and several source images, text
padding, zero_cond_t, odd head count, non-square images), checkpoint validation, sharded forward."""
from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arr_jax.convert.qwen_image import load_qwen_image_transformer, qwen_image_key_map
from arr_jax.convert.safetensors_io import CheckpointFormatError
from arr_jax.models.qwen_image import qwen_rope_ids
from arr_jax.nn.lora import LoRAConfig
from arr_jax.sharding import make_mesh, make_rules

# 3 heads (odd) x 16, RoPE (frame, row, col) = (4, 6, 6)
TINY = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=3, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
B, L = 2, 7
# target 3x4 tokens (non-square), then two sources of 2x2 and 4x3 tokens
SHAPES = {"t2i": [(1, 3, 4)], "edit": [(1, 3, 4), (1, 2, 2), (1, 4, 3)]}
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _inputs(kind: str, masked: bool):
    rng = np.random.default_rng(1)
    n = sum(f * h * w for f, h, w in SHAPES[kind])
    mask = np.ones((B, L), bool)
    if masked:
        mask[1, 4:] = False  # the second prompt is 4 tokens long
    return dict(img=rng.standard_normal((B, n, 16), np.float32), txt=rng.standard_normal((B, L, 32), np.float32),
                timestep=np.array([0.37, 1.0], np.float32), mask=mask)


def _reference(model, kind, x, masked):
    import torch

    with torch.no_grad():
        return model(hidden_states=torch.from_numpy(x["img"]), encoder_hidden_states=torch.from_numpy(x["txt"]),
                     encoder_hidden_states_mask=torch.from_numpy(x["mask"]) if masked else None,
                     timestep=torch.from_numpy(x["timestep"]), img_shapes=[SHAPES[kind]] * B).sample.numpy()


def _ours(model, kind, x, masked):
    img_ids, txt_ids = qwen_rope_ids(SHAPES[kind], L)
    f, h, w = SHAPES[kind][0]
    return np.asarray(model(jnp.asarray(x["img"]), jnp.asarray(x["txt"]), jnp.asarray(x["timestep"]),
                            jnp.asarray(img_ids), jnp.asarray(txt_ids),
                            txt_mask=jnp.asarray(x["mask"]) if masked else None, n_target=f * h * w))


def _perturb(model, scale=0.05):
    import torch

    with torch.no_grad():  # make every init (norm scales, biases) generic
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.add_(scale * torch.randn_like(p))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random diffusers transformers (plain and zero_cond_t) saved to disk."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    out = {}
    for zero_cond in (False, True):
        torch.manual_seed(0)
        model = diffusers.QwenImageTransformer2DModel(zero_cond_t=zero_cond, **TINY).eval()
        _perturb(model)
        path = tmp_path_factory.mktemp(f"qwen_image_z{int(zero_cond)}")
        model.save_pretrained(path)
        out[zero_cond] = (path, model)
    return out


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parity
@pytest.mark.parametrize("kind,masked,zero_cond", [("t2i", False, False), ("t2i", True, False),
                                                   ("edit", True, False), ("edit", True, True)])
def test_matches_diffusers(checkpoints, kind, masked, zero_cond):
    path, ref_model = checkpoints[zero_cond]
    model = load_qwen_image_transformer(path)
    assert model.config.zero_cond_t is zero_cond and model.config.num_attention_heads == 3
    x = _inputs(kind, masked)
    ref, out = _reference(ref_model, kind, x, masked), _ours(model, kind, x, masked)
    rel = _rel(out, ref)
    print(f"{kind} masked={masked} zero_cond_t={zero_cond}: rel err {rel:.2e}, max abs {np.abs(out - ref).max():.2e}")
    assert out.shape == ref.shape == (B, x["img"].shape[1], 16)
    assert rel <= 1e-5
    if masked:  # padding really is ignored: changing the padded text changes nothing
        x2 = dict(x, txt=np.where(x["mask"][..., None], x["txt"], 100.0).astype(np.float32))
        np.testing.assert_allclose(_ours(model, kind, x2, masked), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parity
def test_rope_ids_match_diffusers():
    import torch
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    rope = QwenEmbedRope(theta=10000, axes_dim=[4, 6, 6], scale_rope=True)
    vid, txt = rope([SHAPES["edit"]], max_txt_seq_len=L, device=torch.device("cpu"))
    img_ids, txt_ids = qwen_rope_ids(SHAPES["edit"], L)
    from arr_jax.models.qwen_image import qwen_rope_angles

    for ids, ref in ((img_ids, vid), (txt_ids, txt)):
        cos, sin = qwen_rope_angles(jnp.asarray(ids), (4, 6, 6), 10000.0)
        np.testing.assert_allclose(np.asarray(cos), ref.real.numpy(), atol=1e-6)
        np.testing.assert_allclose(np.asarray(sin), ref.imag.numpy(), atol=1e-6)
    assert img_ids[:12, 1].min() == -2 and img_ids[:12, 1].max() == 0  # centred rows of the 3-row target
    assert txt_ids[0, 0] == 2  # text starts after the widest image half (4 // 2)


def test_key_map():
    assert qwen_image_key_map("transformer_blocks.3.img_mod.1.weight")[0] == (
        "transformer_blocks", 3, "img_mod", 1, "kernel")
    assert qwen_image_key_map("txt_norm.weight") == (("txt_norm", "weight"), None)
    assert qwen_image_key_map("transformer_blocks.0.attn.norm_added_k.weight")[1] is None
    assert qwen_image_key_map("transformer_blocks.0.attn.to_out.0.bias")[0][-3:] == ("to_out", 0, "bias")


@pytest.mark.parity
def test_bad_checkpoints_name_the_problem(checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file

    src, _ = checkpoints[False]
    d = tmp_path / "extra"
    shutil.copytree(src, d)
    sd = load_file(str(d / WEIGHTS))
    sd["transformer_blocks.0.attn.to_q.lora_magic"] = np.zeros(3, np.float32)
    del sd["proj_out.bias"]
    sd["img_in.weight"] = sd["img_in.weight"][:, :8]
    save_file(sd, str(d / WEIGHTS))
    with pytest.raises(CheckpointFormatError) as e:
        load_qwen_image_transformer(d)
    msg = str(e.value)
    assert "lora_magic" in msg and "proj_out.bias" in msg and "img_in.weight" in msg
    cfg = json.loads((src / "config.json").read_text())
    for change, match in (({"_class_name": "FluxTransformer2DModel"}, "not QwenImageTransformer2DModel"),
                          ({"use_layer3d_rope": True}, "use_layer3d_rope=true")):
        d2 = tmp_path / f"cfg{len(match)}"
        shutil.copytree(src, d2)
        (d2 / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=match):
            load_qwen_image_transformer(d2)


@pytest.mark.parity
def test_sharded_lora_forward_matches(checkpoints):
    """FSDP x TP sharded loading (LoRA attached, B = 0) gives the unsharded output."""
    path, _ = checkpoints[False]
    x = _inputs("edit", True)
    ref = _ours(load_qwen_image_transformer(path), "edit", x, True)
    rules = make_rules(make_mesh(data=2, fsdp=2, tensor=2))
    model = load_qwen_image_transformer(path, rules=rules, lora=LoRAConfig(rank=4, alpha=8.0))
    k = model.transformer_blocks[0].attn.to_q.kernel.get_value()
    assert k.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    graphdef, state = nnx.split(model)
    args = [jnp.asarray(a) for a in (x["img"], x["txt"], x["timestep"], *qwen_rope_ids(SHAPES["edit"], L), x["mask"])]
    out = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a[:5], txt_mask=a[5], n_target=12))(state, *args)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parity
def test_scanned_blocks_match_diffusers_sharded_with_lora(checkpoints):
    """``scan_blocks``: the blocks stored stacked (loaded from diffusers' per-block names), one lax.scan, sharded
    FSDP x TP with LoRA (B = 0) and remat: diffusers' output; the stacked kernel keeps its sharded layout."""
    from arr_jax.nn.stack import StackedBlocks

    path, ref_model = checkpoints[True]
    x = _inputs("edit", True)
    ref = _reference(ref_model, "edit", x, True)
    rules = make_rules(make_mesh(data=2, fsdp=2, tensor=2))
    model = load_qwen_image_transformer(path, rules=rules, lora=LoRAConfig(rank=4, alpha=8.0), scan_blocks=True,
                                        remat="full")
    assert isinstance(model.transformer_blocks, StackedBlocks)
    k = model.transformer_blocks.block.attn.to_q.kernel.get_value()
    assert k.shape[0] == model.config.num_layers
    assert k.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    graphdef, state = nnx.split(model)
    args = [jnp.asarray(a) for a in (x["img"], x["txt"], x["timestep"], *qwen_rope_ids(SHAPES["edit"], L), x["mask"])]
    out = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a[:5], txt_mask=a[5], n_target=12))(state, *args)
    assert _rel(np.asarray(out), ref) <= 1e-5
