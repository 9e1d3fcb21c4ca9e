"""Qwen3-VL processor (PIL + numpy + tokenizers) against transformers' Qwen3VLProcessor."""
from __future__ import annotations

import functools
import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from test_qwen3_vl import IMAGE, PATCH, TPATCH, MERGE, hf_logits, jitted_forward, rel_err, tiny_snapshot

SPECIAL = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>",
           "<|endoftext|>"]
PREPROC = {"patch_size": PATCH, "temporal_patch_size": TPATCH, "merge_size": MERGE,
           "size": {"shortest_edge": 32 * 32, "longest_edge": 48 * 48},
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


@functools.lru_cache(maxsize=None)
def snapshot_with_tokenizer() -> str:
    """The tiny model snapshot plus a byte-level BPE ``tokenizer.json`` and ``preprocessor_config.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = [f"w{i}x{i * 7 % 13}" for i in range(300)] + ["which image is better", "image one", "answer 1 or 2"]
    trainer = trainers.BpeTrainer(vocab_size=IMAGE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([" ".join(words)] * 3, trainer)
    assert tok.get_vocab_size() == IMAGE
    tok.add_special_tokens(SPECIAL)
    assert tok.token_to_id("<|image_pad|>") == IMAGE
    d = Path(tempfile.mkdtemp(prefix="tiny_qwen3_vl_proc_"))
    for f in Path(tiny_snapshot()[0]).iterdir():
        shutil.copy(f, d / f.name)
    tok.save(str(d / "tokenizer.json"))
    (d / "preprocessor_config.json").write_text(json.dumps(PREPROC))
    return str(d)


def hf_processor():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor as HFProcessor

    class NoVideoProcessor(HFProcessor):
        """transformers 5 checks the video processor's class, which needs torchvision; skip it for None."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and "video" in argument_name:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    d = snapshot_with_tokenizer()
    ft = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(f"{d}/tokenizer.json"))
    ip = Qwen2VLImageProcessorPil(**{k: v for k, v in PREPROC.items()})
    return NoVideoProcessor(image_processor=ip, tokenizer=ft, video_processor=None)


def images():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)                     # resized down (max_pixels)
    rgba = rng.integers(0, 256, (20, 24, 4), dtype=np.uint8)                  # resized up, alpha on white
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return [Image.fromarray(a), buf.getvalue()]


def chat():
    return [{"role": "system", "content": "answer 1 or 2"},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "image one"},
                                         {"type": "image"}, {"type": "text", "text": "which image is better"}]}]


def test_chat_format():
    from arr_jax.judge.processor import Qwen3VLProcessor

    p = Qwen3VLProcessor.from_dir(snapshot_with_tokenizer())
    assert p.format_chat(chat()) == (
        "<|im_start|>system\nanswer 1 or 2<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>image one<|vision_start|><|image_pad|><|vision_end|>"
        "which image is better<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parity
def test_matches_transformers_processor_and_model():
    from PIL import Image

    from arr_jax.judge.processor import Qwen3VLProcessor

    ours = Qwen3VLProcessor.from_dir(snapshot_with_tokenizer())
    text = ours.format_chat(chat())
    imgs = images()
    ids, pv, grid = ours.encode(text, imgs)
    ref = hf_processor()(text=[text], images=[imgs[0], Image.open(io.BytesIO(imgs[1]))], return_tensors="np")
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    np.testing.assert_array_equal(np.array([ids]), ref["input_ids"])
    np.testing.assert_allclose(pv, ref["pixel_values"], atol=1e-5)
    assert grid.tolist() == [[1, 4, 6], [1, 4, 6]]  # 50x70 scaled down, 20x24 scaled up
    # batched, bucketed processor output through our model == transformers on the processor's arrays
    batch = ours([(chat(), imgs)], seq_bucket=32, patch_bucket=32, image_bucket=4)
    assert batch["input_ids"].shape[1] % 32 == 0 and batch["pixel_values"].shape[:2] == (4, 32)
    logits = jitted_forward()(batch)
    mask = batch["attention_mask"].astype(bool)
    hf = hf_logits(tiny_snapshot()[1], ref["input_ids"], ref["attention_mask"], ref["pixel_values"],
                   ref["image_grid_thw"])
    assert rel_err(logits[mask], hf[0]) <= 1e-4


def test_resize_bounds_and_buckets():
    from arr_jax.judge.processor import smart_resize

    for h, w in [(10, 10), (50, 70), (1000, 300), (33, 17)]:
        rh, rw = smart_resize(h, w, 16, 32 * 32, 48 * 48)
        assert rh % 16 == 0 and rw % 16 == 0 and 32 * 32 <= rh * rw <= 48 * 48, (h, w, rh, rw)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 500, 16, 1024, 2304)


def test_undecodable_image_is_a_clear_error(tmp_path):
    from arr_jax.judge.processor import ImageDecodeError, Qwen3VLProcessor

    p = Qwen3VLProcessor.from_dir(snapshot_with_tokenizer())
    text = p.format_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "image one"}]}])
    with pytest.raises(ImageDecodeError, match="could not decode bytes input"):
        p.encode(text, [b"definitely not a png"])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        p.encode(text, [str(bad)])
    with pytest.raises(ValueError, match="1 image placeholders but 2 images"):
        p.encode(text, images()[:1] * 2)


# Thin images (under a small max_pixels the long side shrinks, the short one must not reach 0) and images
# smaller than one 16 px patch / the 28 px of older Qwen-VL processors (resized up to min_pixels).
SMALL_AND_THIN = [(1, 1), (3, 1), (1, 3), (10, 10), (27, 5), (5, 27), (3, 500), (500, 4), (4, 800), (1, 150),
                  (1000, 9)]


@pytest.mark.parity
@pytest.mark.parametrize("size", SMALL_AND_THIN)
def test_small_and_thin_images_match_transformers(size):
    """Token ids, grids and pixels of tiny and thin images equal transformers' processor's; no side is ever 0."""
    from PIL import Image

    from arr_jax.judge.processor import Qwen3VLProcessor

    p = Qwen3VLProcessor.from_dir(snapshot_with_tokenizer())
    text = p.format_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "image one"}]}])
    img = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8))
    ids, pv, grid = p.encode(text, [img])
    ref = hf_processor()(text=[text], images=[img], return_tensors="np")
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    np.testing.assert_array_equal(np.array([ids]), ref["input_ids"])
    np.testing.assert_allclose(pv, ref["pixel_values"], atol=1e-5)
    assert grid[0, 1] >= MERGE and grid[0, 2] >= MERGE   # at least one merged token per side


@pytest.mark.parity
def test_smart_resize_matches_transformers_on_thin_and_tiny_sizes():
    """`smart_resize` == transformers' Qwen2-VL ``smart_resize`` (used by Qwen3-VL) at Qwen3-VL's factor 32 and
    real limits and at small limits: multiples of the factor, never a zero side, aspect ratio over 200 refused."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    from arr_jax.judge.processor import smart_resize

    sizes = [(h, w) for h in (1, 2, 5, 16, 27, 31, 100, 1000, 4000) for w in (1, 3, 20, 28, 64, 999, 3000)
             if max(h, w) / min(h, w) <= 200]
    for factor, lo, hi in ((32, 65536, 16777216), (32, 32 * 32, 64 * 64), (16, 16 * 16, 32 * 32)):
        for h, w in sizes:
            got = smart_resize(h, w, factor, lo, hi)
            assert got == hf_smart_resize(h, w, factor, lo, hi), (h, w, factor, lo, hi)
            assert min(got) >= factor and got[0] % factor == 0 and got[1] % factor == 0, (h, w, got)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 201, 32, 1024, 4096)
