"""The run's pictures: before/after blocks with per-criterion marks, grouped curve panels."""
import numpy as np
import pytest
from PIL import Image

from arr_jax.rpo.figures import CRITERION_MARKS, save_before_after, save_curves

GREEN, RED = np.array([0x1a, 0x96, 0x41]), np.array([0xd7, 0x19, 0x1c])


def _near(img, colour, tol=40):
    return int((np.abs(img[..., :3].astype(int) - colour).sum(-1) < tol).sum())


def _images(p, k, value):
    x = np.zeros((p, k, 16, 12, 3), np.uint8)
    x[..., 2] = value  # blue only: no pixel of the images is near the marks' green or red
    return x


def test_before_after_marks_follow_the_checks(tmp_path):
    p, k = 3, 2
    crits = ("colour", "shape", "count", "position")
    ok = {c: np.ones((p, k), bool) for c in crits}
    bad = {c: np.zeros((p, k), bool) for c in crits}
    a = np.asarray(Image.open(save_before_after(tmp_path / "a.png", ["x", "y", "z"], _images(p, k, 90),
                                                _images(p, k, 200), "t", checks_base=ok, checks_rpo=ok)))
    b = np.asarray(Image.open(save_before_after(tmp_path / "b.png", ["x", "y", "z"], _images(p, k, 90),
                                                _images(p, k, 200), "t", checks_base=bad, checks_rpo=ok)))
    assert _near(a, GREEN) > 0 and _near(a, RED) == 0
    assert _near(b, RED) > 0 and 0.3 < _near(b, GREEN) / _near(a, GREEN) < 0.7
    # 3 prompts, 2 blocks per row: two rows of blocks; without checks no marks at all
    c = np.asarray(Image.open(save_before_after(tmp_path / "c.png", ["x", "y", "z"], _images(p, k, 90),
                                                _images(p, k, 200), "t")))
    assert _near(c, GREEN) == 0 and _near(c, RED) == 0
    assert c.shape[0] > c.shape[1] * 0.8  # two block rows, each about as tall as a block is wide
    assert set(CRITERION_MARKS) >= set(crits)


def test_before_after_names_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"\(P=2, K, H, W, 3\)"):
        save_before_after(tmp_path / "x.png", ["a", "b"], _images(2, 2, 9), _images(2, 3, 9), "t")
    with pytest.raises(ValueError, match=r"checks_rpo\['shape'\] has shape \(2,\)"):
        save_before_after(tmp_path / "x.png", ["a", "b"], _images(2, 2, 9), _images(2, 2, 9), "t",
                          checks_base={"shape": np.ones((2, 2), bool)}, checks_rpo={"shape": np.ones(2, bool)})
    with pytest.raises(ValueError, match=r"checks_base names \['shape'\] but checks_rpo names \['count'\]"):
        save_before_after(tmp_path / "x.png", ["a", "b"], _images(2, 2, 9), _images(2, 2, 9), "t",
                          checks_base={"shape": np.ones((2, 2), bool)}, checks_rpo={"count": np.ones((2, 2), bool)})


def test_curves_group_metrics_into_one_panel(tmp_path):
    hist = [{"iteration": i, "a": i * 0.1, "eval/c/x": 0.2, "eval/c/y": 0.3} for i in range(12)]
    one = np.asarray(Image.open(save_curves(tmp_path / "1.png", hist, ["a", ("eval/c/x", "eval/c/y"), "missing"],
                                            "t", cols=3)))
    two = np.asarray(Image.open(save_curves(tmp_path / "2.png", hist, ["a", "eval/c/x", "eval/c/y"], "t", cols=3)))
    assert one.shape[1] < two.shape[1]  # two panels, not three
    assert save_curves(tmp_path / "3.png", hist, ["missing"], "t") is None
