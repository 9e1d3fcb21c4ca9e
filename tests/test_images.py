"""One image conversion (`arr_jax.data.images.to_rgb_uint8`) for every path that reads an image:
bit depths, float, transparency, palette, CMYK, EXIF, arrays and their layouts, named errors; the
judge loader, the data loader, the EditReward-Bench converter and the API encoder agree; and no
other module in arr_jax calls Pillow's mode conversion."""
from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arr_jax.data.images import ImageDecodeError, rgb_encoded, to_rgb_uint8, to_rgb_uint8_batch

ROOT = Path(__file__).resolve().parents[1]


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def ramp16() -> np.ndarray:
    """A 0..65535 ramp (64 x 256) as uint16: mean 32767.5, i.e. 127.5 in 8 bits."""
    return np.round(np.linspace(0, 65535, 64 * 256)).astype(np.uint16).reshape(64, 256)


def rgba_noise(seed=0, shape=(20, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape + (4,), dtype=np.uint8)


def on_white(rgba: np.ndarray) -> np.ndarray:
    """Straight-alpha 'over' a white background, in float (the reference formula)."""
    a = rgba[..., 3:].astype(np.float64) / 255
    return rgba[..., :3] * a + 255 * (1 - a)


def readers(tmp_path: Path):
    """Every reader of an image file in arr_jax -> uint8 (H, W, 3), by name."""
    from arr_jax import sample
    from arr_jax.data import converters
    from arr_jax.data.preference_tfds import read_image, rgb_bytes
    from arr_jax.judge.processor import load_image

    def editreward(path):  # the EditReward-Bench converter extracts the image; read its file plainly
        out = tmp_path / f"er_{Path(path).stem}"
        rec = {"id": "x", "instruction": "edit", "dataset": "2pair", "ranking": "A>B",
               "source_image": str(path), "candidate_1": str(path), "candidate_2": str(path)}
        src = tmp_path / f"er_{Path(path).stem}.jsonl"
        src.write_text(json.dumps(rec) + "\n")
        rep = converters.convert_editreward_bench(src, out)
        assert rep.written == 1, rep
        row = json.loads(rep.path.read_text())
        with Image.open(row["image1"]) as im:
            return np.asarray(im)

    return {"judge": lambda p: np.asarray(load_image(p)), "judge_bytes": lambda p: np.asarray(load_image(
        Path(p).read_bytes())), "data": read_image, "tfds_bytes": lambda p: np.asarray(Image.open(io.BytesIO(
            rgb_bytes(p)))), "editreward": editreward, "sample": sample.load_image}


def all_paths(tmp_path, path) -> dict[str, np.ndarray]:
    out = {k: f(path) for k, f in readers(tmp_path).items()}
    for k, v in out.items():
        assert v.dtype == np.uint8 and v.ndim == 3 and v.shape[-1] == 3, (k, v.dtype, v.shape)
    return out


def test_16_bit_ramp_is_scaled_on_every_path(tmp_path):
    path = tmp_path / "ramp16.png"
    path.write_bytes(encode(Image.fromarray(ramp16())))
    assert Image.open(path).mode == "I;16"
    for k, v in all_paths(tmp_path, path).items():
        assert abs(v.mean() - 127.5) < 0.6, (k, v.mean())       # Pillow's convert clips: ~254
        assert v[0, 0, 0] == 0 and v[-1, -1, 0] == 255, k
        assert (v[..., 0] == v[..., 2]).all(), k
    # the same ramp as a 32-bit 'I' image (TIFF) and as a uint16 array
    tif = tmp_path / "ramp_i32.tif"
    Image.fromarray(ramp16().astype(np.int32)).save(tif)
    assert Image.open(tif).mode == "I"
    assert abs(to_rgb_uint8(tif).mean() - 127.5) < 0.6
    np.testing.assert_array_equal(to_rgb_uint8(ramp16()), to_rgb_uint8(tif))
    np.testing.assert_array_equal(to_rgb_uint8(ramp16())[..., 0], np.round(ramp16() / 257).astype(np.uint8))


def test_mode_i_beyond_16_bits_is_a_named_error(tmp_path):
    tif = tmp_path / "big.tif"
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tif)
    with pytest.raises(ImageDecodeError, match=r"big\.tif.*mode I values span \[70000, 70000\].*bit depth"):
        to_rgb_uint8(tif)


def test_float_tiff_is_scaled_from_unit_range(tmp_path):
    path = tmp_path / "half.tif"
    Image.fromarray(np.full((8, 12), 0.5, np.float32)).save(path)
    assert Image.open(path).mode == "F"
    for k, v in all_paths(tmp_path, path).items():
        assert v.shape == (8, 12, 3) and (v == 128).all(), (k, np.unique(v))
    bad = tmp_path / "two.tif"
    Image.fromarray(np.full((4, 4), 2.0, np.float32)).save(bad)
    with pytest.raises(ImageDecodeError, match=r"two\.tif.*\[0, 1\]"):
        to_rgb_uint8(bad)


def test_transparent_rgba_is_the_same_on_every_path(tmp_path):
    clear = np.zeros((16, 20, 4), np.uint8)
    clear[..., :3] = (10, 200, 30)                                # a colour, fully transparent
    path = tmp_path / "clear.png"
    path.write_bytes(encode(Image.fromarray(clear, "RGBA")))
    for k, v in all_paths(tmp_path, path).items():
        assert (v == 255).all(), (k, np.unique(v))
    # half transparency: every path gives the same pixels, the colour over white
    noise = rgba_noise(1)
    path = tmp_path / "noise.png"
    path.write_bytes(encode(Image.fromarray(noise, "RGBA")))
    got = all_paths(tmp_path, path)
    for k, v in got.items():
        np.testing.assert_array_equal(v, got["judge"], err_msg=k)
    assert np.abs(got["judge"] - on_white(noise)).max() <= 1.0
    np.testing.assert_array_equal(to_rgb_uint8(noise), got["judge"])   # an RGBA array: the same pixels
    from arr_jax.judge.api import encode_image

    url = encode_image(noise, "png")                               # what an API judge is sent
    sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    np.testing.assert_array_equal(sent, got["judge"])
    assert encode_image(noise, "jpeg") == encode_image(got["judge"], "jpeg")


@pytest.mark.parity
def test_pil_modes_match_transformers(tmp_path):
    """Every 8-bit mode and the EXIF orientation as transformers' load_image + convert_to_rgb."""
    from PIL import ImageOps
    from transformers.image_transforms import convert_to_rgb
    from transformers.image_utils import load_image

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (12, 18, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    pal = base.quantize(8)
    pal.info["transparency"] = 2                                   # palette entry 2 is transparent
    la = Image.fromarray(np.stack([rgb[..., 0], rgb[..., 1]], -1), "LA")
    grey_key = Image.fromarray(rgb[..., 0])
    exif = Image.Exif()
    exif[0x0112] = 6                                               # rotate 90 degrees clockwise to view
    files = {
        "palette_transparency.png": encode(pal, transparency=2),
        "palette.gif": encode(base.quantize(16), "GIF"),
        "la.png": encode(la),
        "rgba.png": encode(Image.fromarray(rgba_noise(4, (12, 18)), "RGBA")),
        "grey_trns.png": encode(grey_key, transparency=int(rgb[0, 0, 0])),
        "cmyk.jpg": encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95),
        "cmyk.tif": encode(Image.fromarray(rgb).convert("CMYK"), "TIFF"),
        "bilevel.png": encode(base.convert("1")),
        "ycbcr.tif": encode(base.convert("YCbCr"), "TIFF"),
        "grey.jpg": encode(base.convert("L"), "JPEG"),
        "rgb.webp": encode(base, "WEBP", lossless=True),
        "exif6.png": encode(base, exif=exif),
        "exif6.jpg": encode(base, "JPEG", exif=exif),
    }
    modes = set()
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        with Image.open(path) as im:
            modes.add(im.mode)
            want = convert_to_rgb(ImageOps.exif_transpose(im), return_numpy=True)
        if "exif" in name:
            np.testing.assert_array_equal(np.asarray(load_image(str(path))), want)
            assert want.shape == (18, 12, 3)
        got = to_rgb_uint8(path)
        np.testing.assert_array_equal(got, want, err_msg=name)
        np.testing.assert_array_equal(to_rgb_uint8(data), want, err_msg=name)
        with Image.open(path) as im:
            np.testing.assert_array_equal(to_rgb_uint8(im), want, err_msg=name)
    assert {"P", "LA", "RGBA", "CMYK", "1", "YCbCr", "L"} <= modes, modes
    # the transparent palette entry and the transparent grey value come out white
    idx = np.asarray(pal) == 2
    assert idx.any() and (to_rgb_uint8(tmp_path / "palette_transparency.png")[idx] == 255).all()
    key = rgb[..., 0] == rgb[0, 0, 0]
    assert (to_rgb_uint8(tmp_path / "grey_trns.png")[key] == 255).all()
    # arrays as transformers' convert_to_rgb (grey repeated, RGB as is, RGBA over white)
    rgba = rgba_noise(8, (12, 18))
    for arr in (rgb[..., :1], rgb, rgba):
        want = convert_to_rgb(arr, return_numpy=True)
        assert want.shape == (12, 18, 3)
        assert np.abs(to_rgb_uint8(arr).astype(int) - want).max() <= (1 if arr is rgba else 0)


def test_cmyk_values_and_premultiplied_modes():
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))             # no black, full magenta + yellow: red
    np.testing.assert_array_equal(to_rgb_uint8(encode(cmyk, "TIFF"))[0, 0], (255, 0, 0))
    la = Image.new("LA", (2, 2), (40, 0))                          # transparent grey: white
    assert (to_rgb_uint8(la) == 255).all()
    assert (to_rgb_uint8(la.convert("La")) == 255).all()
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 128))               # half-transparent black: mid grey
    np.testing.assert_array_equal(to_rgb_uint8(rgba)[0, 0], to_rgb_uint8(rgba.convert("RGBa"))[0, 0])
    assert abs(int(to_rgb_uint8(rgba)[0, 0, 0]) - 127) <= 1


def test_array_layouts_and_dtypes():
    rng = np.random.default_rng(5)
    g = rng.integers(0, 256, (6, 7), dtype=np.uint8)
    want = np.repeat(g[..., None], 3, -1)
    for arr in (g, g[..., None], want, np.concatenate([want, np.full_like(g[..., None], 255)], -1)):
        np.testing.assert_array_equal(to_rgb_uint8(arr), want)
    np.testing.assert_array_equal(to_rgb_uint8(g.astype(np.uint16) * 257), want)        # 16 bits
    np.testing.assert_array_equal(to_rgb_uint8(g / 255.0), want)                         # float [0, 1]
    np.testing.assert_array_equal(to_rgb_uint8(g.astype(np.float32) / 255), want)
    assert (to_rgb_uint8(np.full((2, 2, 3), 0.5, np.float16)) == 128).all()
    np.testing.assert_array_equal(to_rgb_uint8(g > 127)[..., 0], np.where(g > 127, 255, 0))
    out = to_rgb_uint8(want)
    out[0, 0] = 7
    assert want[0, 0, 0] != 7 or g[0, 0] == 7                    # a new array, not a view of the input
    layout = r"\(H, W\), \(H, W, 1\), \(H, W, 3\) or \(H, W, 4\)"
    for bad in (np.zeros((4, 4, 5), np.uint8), np.zeros((4, 4, 2), np.uint8), np.zeros((2, 4, 4, 3), np.uint8),
                np.zeros(8, np.uint8), np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(ImageDecodeError, match=rf"ndarray input uint8 {re.escape(str(bad.shape))}.*{layout}"):
            to_rgb_uint8(bad)
    with pytest.raises(ImageDecodeError, match=r"int64 \(4, 4, 3\).*must be uint8, uint16, bool or float"):
        to_rgb_uint8(np.zeros((4, 4, 3), np.int64))
    with pytest.raises(ImageDecodeError, match=r"\[0, 1\]; got \[-1.0, 1.0\]"):
        to_rgb_uint8(np.linspace(-1, 1, 12).reshape(2, 2, 3))     # FLUX's [-1, 1] is not an image here
    with pytest.raises(ImageDecodeError, match="NaN"):
        to_rgb_uint8(np.full((2, 2), np.nan))
    with pytest.raises(ImageDecodeError, match="source of pair 7"):
        to_rgb_uint8(np.zeros((2, 2, 9)), name="source of pair 7")
    with pytest.raises(ImageDecodeError, match="cannot make an image from int input"):
        to_rgb_uint8(3)
    assert issubclass(ImageDecodeError, ValueError)


def test_batches_accept_images_and_reject_ambiguous_layouts(tmp_path):
    rgba = rgba_noise(2, (32, 32))
    np.testing.assert_array_equal(to_rgb_uint8_batch(rgba[None]), to_rgb_uint8(rgba)[None])
    grey = rgba[..., 0]
    np.testing.assert_array_equal(to_rgb_uint8_batch(grey), np.repeat(grey[None, ..., None], 3, -1))
    np.testing.assert_array_equal(to_rgb_uint8_batch(rgba[..., :3]), rgba[None, ..., :3])
    two = np.stack([rgba, 255 - rgba])
    np.testing.assert_array_equal(to_rgb_uint8_batch(two), np.stack([to_rgb_uint8(a) for a in two]))
    path = tmp_path / "a.png"
    path.write_bytes(encode(Image.fromarray(rgba, "RGBA")))
    np.testing.assert_array_equal(to_rgb_uint8_batch([path, Image.fromarray(rgba, "RGBA"), rgba]),
                                  np.stack([to_rgb_uint8(rgba)] * 3))
    for bad in ((2, 32, 32), (1, 32, 32), (3, 32, 32), (2, 2, 32, 32, 3)):
        with pytest.raises(ValueError, match=r"Kontext sources: expected an array \(B, H, W, 3\).*"
                                             + re.escape(str(bad))):
            to_rgb_uint8_batch(np.zeros(bad, np.uint8), name="Kontext sources")
    with pytest.raises(ValueError, match=r"one size.*\(32, 32\), \(8, 8\)"):
        to_rgb_uint8_batch([rgba, rgba[:8, :8]])
    with pytest.raises(ValueError, match=r"images\[1\] \(ndarray input uint8 \(32, 32, 7\)\)"):
        to_rgb_uint8_batch([rgba, np.zeros((32, 32, 7), np.uint8)])


def test_undecodable_inputs_name_the_input(tmp_path):
    good = encode(Image.fromarray(rgba_noise(6)[..., :3]))
    broken = tmp_path / "broken.png"
    broken.write_bytes(good[: len(good) // 2])                    # truncated
    with pytest.raises(ImageDecodeError, match=r"could not decode file .*broken\.png as an image"):
        to_rgb_uint8(broken)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ImageDecodeError, match=r"file .*notes\.jpg.*UnidentifiedImageError"):
        to_rgb_uint8(str(text))
    with pytest.raises(ImageDecodeError, match=r"file .*missing\.png.*no such file"):
        to_rgb_uint8(tmp_path / "missing.png")
    with pytest.raises(ImageDecodeError, match=r"bytes input \(5 bytes\)"):
        to_rgb_uint8(b"\x89PNG\r")
    from arr_jax.data.preference_tfds import read_image

    with pytest.raises(ValueError, match=r"broken\.png"):
        read_image(broken)


def test_rgb_encoded_keeps_plain_files_and_reencodes_the_rest():
    rgb = rgba_noise(7)[..., :3]
    for fmt in ("PNG", "JPEG"):
        data = encode(Image.fromarray(rgb), fmt)
        assert rgb_encoded(data) == (data, {"PNG": "png", "JPEG": "jpg"}[fmt])  # original bytes kept
    exif = Image.Exif()
    exif[0x0112] = 3                                                # rotated 180 degrees
    for data in (encode(Image.fromarray(rgba_noise(7), "RGBA")), encode(Image.fromarray(ramp16())),
                 encode(Image.fromarray(rgb), exif=exif), encode(Image.fromarray(rgb), "BMP")):
        out, ext = rgb_encoded(data)
        assert ext == "png" and out != data
        with Image.open(io.BytesIO(out)) as im:
            assert im.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(im), to_rgb_uint8(data))


def test_only_the_image_module_converts_modes():
    """Pillow's mode conversion (``.convert(``) and file decoding (``Image.open(``) appear in one module."""
    allowed = {"arr_jax/data/images.py"}
    found = {}
    for path in sorted((ROOT / "arr_jax").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text(encoding="utf-8")
        for pat in (r"\.convert\(", r"Image\.open\(", r"alpha_composite\("):
            for m in re.finditer(pat, text):
                found.setdefault(rel, []).append(f"{text.count(chr(10), 0, m.start()) + 1}: {m.group()}")
    assert set(found) == allowed, {k: v for k, v in found.items() if k not in allowed}
