"""Public inputs normalised as diffusers' pipelines take them (issue #19, kind 9): a string is one prompt,
a single PIL image is one source image; anything else is one clear error."""
import numpy as np
import pytest
from PIL import Image

from arr_jax.diffusion.qwen_image_pipeline import as_source_lists
from arr_jax.diffusion.qwen_image_text import as_prompt_list


def test_a_string_is_one_prompt_never_its_characters():
    assert as_prompt_list("a hat") == ["a hat"]
    assert as_prompt_list(["a hat", "a cat"]) == ["a hat", "a cat"]
    assert as_prompt_list(("a",)) == ["a"] and as_prompt_list(np.array(["x", "y"])) == ["x", "y"]
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a string, got int"):
        as_prompt_list(["a", 3])
    with pytest.raises(TypeError, match="prompts must be a string or a list of strings, got dict"):
        as_prompt_list({"a": 1})
    with pytest.raises(ValueError, match="prompts is empty"):
        as_prompt_list([])


def test_a_single_pil_image_is_the_source_of_every_prompt():
    arr = np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    pil = Image.fromarray(arr)
    for given in (pil, [pil], [[pil]], arr):
        out = as_source_lists(given, 2)
        assert len(out) == 2 and all(len(x) == 1 for x in out)
        np.testing.assert_array_equal(out[1][0], arr)
    two = as_source_lists([[pil, Image.fromarray(arr[:, ::-1])], [pil]], 2)
    np.testing.assert_array_equal(two[0][1], arr[:, ::-1])
    rgba = Image.fromarray(np.dstack([arr, np.full(arr.shape[:2], 255, np.uint8)]))
    assert as_source_lists(rgba, 1)[0][0].shape == (16, 24, 3)
    with pytest.raises(ValueError, match="3 source entries for 2 prompts"):
        as_source_lists([pil, pil, pil], 2)
