"""Qwen-Image pipelines (text-to-image, Edit, Edit-Plus/2509): prompt embeddings and whole-pipeline
parity with diffusers on tiny random snapshots, schedule, bad inputs, sampling entry point."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from arr_jax.convert.qwen_image_snapshot import load_qwen_image_snapshot, qwen2_tokenizer, read_qwen_model_index
from arr_jax.convert.snapshot import SnapshotError
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


def test_prompt_cache_and_release(snaps, tmp_path):
    img = _u8([(40, 56)])[0]
    enc = QwenImagePromptEncoder(snaps["edit_plus"], cache_dir=tmp_path)
    a = enc(PROMPTS, [[img], [img, img]])
    again = QwenImagePromptEncoder(snaps["edit_plus"], cache_dir=tmp_path)  # a new process sees the files
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
