"""Qwen2.5-VL (Qwen-Image's text encoder): hidden-state parity with transformers with one and two
images (windowed + full vision attention, padding), vision layout, loader errors."""
from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arr_jax.convert.qwen2_5_vl import load_qwen2_5_vl
from arr_jax.convert.safetensors_io import CheckpointFormatError
from arr_jax.models.qwen2_5_vl import model_kwargs, prepare_inputs
from arr_jax.models.qwen2_5_vl_text import mrope_chunk_select
from arr_jax.models.qwen2_5_vl_vision import Qwen25VisionConfig, vision_layout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from _tiny_qwen_image import build_tiny

    t = build_tiny()
    d = tmp_path_factory.mktemp("qwen25vl")
    t["text_encoder"].save_pretrained(d)
    t["dir"] = d
    return t


def _images(sizes, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _hf_hidden(tiny, batch):
    import torch

    with torch.no_grad():
        out = tiny["text_encoder"](**{k: v for k, v in batch.items()}, output_hidden_states=True)
    return out.hidden_states[-1].numpy()


@pytest.mark.parity
def test_hidden_states_match_transformers_one_and_two_images(tiny):
    """A padded batch: prompt 0 has one image (window attention over 2x2-unit windows, partial ones),
    prompt 1 two images of other sizes; the vision tower sees all three."""
    model, cfg = load_qwen2_5_vl(tiny["dir"])
    tpl = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    pic = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
    texts = [tpl.format(pic.format(1) + "make the sky green"),
             tpl.format(pic.format(1) + pic.format(2) + "add a hat")]
    imgs = _images([(40, 56), (48, 48), (24, 64)])
    batch = tiny["processor"](text=texts, images=imgs, padding=True, return_tensors="pt")
    assert batch["attention_mask"].numpy().min() == 0  # the batch really is padded
    ref = _hf_hidden(tiny, batch)
    inp = prepare_inputs(cfg, batch["input_ids"].numpy(), batch["attention_mask"].numpy(),
                         batch["pixel_values"].numpy(), batch["image_grid_thw"].numpy(), window_bucket=4)
    fwd = jax.jit(lambda st, inp: nnx.merge(graphdef, st)(inp["input_ids"], inp["positions"], inp["attention_mask"],
                                                          **model_kwargs(inp)))
    graphdef, state = nnx.split(model)
    out = np.asarray(fwd(state, {k: jnp.asarray(v) for k, v in inp.items()}))
    m = batch["attention_mask"].numpy().astype(bool)
    for row, n_img in ((0, 1), (1, 2)):
        rel = _rel(out[row][m[row]], ref[row][m[row]])
        print(f"text encoder, {n_img} image(s): rel err {rel:.2e}")
        assert rel <= 1e-4
    # 40x56 px -> 10x14 patches -> 5x7 units -> 3x4 windows of 2x2 units x 2x2 patches
    assert inp["pixel_values"].shape[1] == 12 * 4 * 4


@pytest.mark.parity
def test_text_only_matches_transformers(tiny):
    model, cfg = load_qwen2_5_vl(tiny["dir"])
    tok = tiny["tokenizer"]
    batch = tok(["a red cat on the blue sofa", "make the sky green"], padding=True, return_tensors="pt")
    ref = _hf_hidden(tiny, dict(batch))
    inp = prepare_inputs(cfg, batch["input_ids"].numpy(), batch["attention_mask"].numpy())
    out = np.asarray(model(jnp.asarray(inp["input_ids"]), jnp.asarray(inp["positions"]),
                           jnp.asarray(inp["attention_mask"])))
    m = inp["attention_mask"].astype(bool)
    assert _rel(out[m], ref[m]) <= 1e-4


def test_vision_layout_windows():
    cfg = Qwen25VisionConfig(patch_size=4, spatial_merge_size=2, window_size=16)  # windows of 2x2 units
    lay = vision_layout([[1, 6, 10]], cfg)  # 3x5 units -> windows 2x3 (partial at the edges)
    assert lay["patch_src"].shape == (1, 6 * 16) and int(lay["valid"].sum()) == 60
    # unit (row 0, col 2) is the first unit of window 1, the token of unit index 2 sits there
    assert lay["token_rows"][2] == 4 and sorted(lay["token_rows"].tolist()) == sorted(set(lay["token_rows"].tolist()))
    r, c = lay["rope_pos"][0][lay["valid"][0]].T
    assert r.max() == 5 and c.max() == 9
    np.testing.assert_array_equal(mrope_chunk_select(16, (2, 3, 3)), [0, 0, 1, 1, 1, 2, 2, 2])


@pytest.mark.parity
def test_loader_errors_name_the_problem(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "bad"
    shutil.copytree(tiny["dir"], d)
    f = next(d.glob("*.safetensors"))
    sd = load_file(str(f))
    sd["visual.merger.extra.weight"] = np.zeros(2, np.float32)  # saved in the transformers-4 layout
    del sd["model.norm.weight"]
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError) as e:
        load_qwen2_5_vl(d)
    assert "merger.extra" in str(e.value) and "language_model.norm.weight" in str(e.value)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3_vl"}))
    with pytest.raises(ValueError, match="model_type='qwen3_vl'.*not a Qwen2.5-VL"):
        load_qwen2_5_vl(d)


@pytest.mark.parity
def test_sharded_text_encoder_matches_unsharded(tiny):
    """The encoder's logical axes on a (data 2, fsdp 2, tensor 2) mesh: loaded straight onto its shards,
    the forward over a batch of 2 images equals the single-device one."""
    from arr_jax.sharding import make_mesh, make_rules

    model, cfg = load_qwen2_5_vl(tiny["dir"])
    rules = make_rules(make_mesh(data=2, fsdp=2, tensor=2))
    sharded, _ = load_qwen2_5_vl(tiny["dir"], rules=rules)
    lm = sharded.model.language_model
    assert lm.layers[0].self_attn.q_proj.kernel.get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert lm.embed_tokens.embedding.get_value().sharding.spec[1] == "fsdp"
    tpl = "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    batch = tiny["processor"](text=[tpl.format("make the sky green"), tpl.format("add a hat")],
                              images=_images([(40, 56), (40, 56)], seed=3), padding=True, return_tensors="np")
    inp = prepare_inputs(cfg, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                         batch["image_grid_thw"])
    args = {k: jnp.asarray(v) for k, v in inp.items()}

    def run(m):
        g, st = nnx.split(m)
        return np.asarray(jax.jit(lambda st, a: nnx.merge(g, st)(a["input_ids"], a["positions"], a["attention_mask"],
                                                                 **model_kwargs(a)))(st, args))

    np.testing.assert_allclose(run(sharded), run(model), rtol=1e-5, atol=1e-5)
