"""The one conversion of an image input to uint8 RGB ``(H, W, 3)``, used by every reader in arr_jax.

`to_rgb_uint8` takes a file path, encoded bytes, a PIL image or an array and returns the pixels the
judge, the data pipeline and the FLUX pipeline all see. It follows transformers' image loading
(``transformers.image_utils.load_image`` then ``image_transforms.convert_to_rgb``), decoding with
Pillow:

* the EXIF orientation tag is applied (``PIL.ImageOps.exif_transpose``), as ``load_image`` does;
* transparency (an alpha band: modes ``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``; or a ``transparency``
  entry: palette ``P`` / ``L`` / ``RGB`` / 16-bit images with a tRNS chunk) is composited onto an
  opaque **white** background, as ``convert_to_rgb`` does, with Pillow's ``alpha_composite``;
* every other 8-bit mode (``1``, ``L``, ``P``, ``RGB``, ``RGBX``, ``CMYK``, ``YCbCr``, ``LAB``,
  ``HSV``) goes through Pillow's ``convert("RGB")``; grey is repeated over the three channels;
* the first frame of a multi-frame file (GIF, APNG, TIFF) is used, and ICC profiles are not applied
  (neither does transformers).

Where transformers would give a wrong picture we scale instead (Pillow's ``convert`` clips):

* 16-bit modes (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``, and ``I``, the mode Pillow gives 16-bit
  samples) hold 0..65535 and are scaled by 255/65535, rounded: a 0..65535 ramp has mean ~127.5, not
  ~251. An ``I`` image with values outside 0..65535 has no known bit depth and is an error;
* float images (mode ``F``, float arrays) hold [0, 1] and are scaled by 255, rounded half up: 0.5
  gives 128. Values outside [0, 1] or NaN are an error (transformers raises as well; it also reads
  float arrays whose values are all whole numbers as 0..255, which we do not);
* arrays: ``(H, W)``, ``(H, W, 1)`` grey, ``(H, W, 3)`` RGB, ``(H, W, 4)`` RGBA, channels last, dtype
  uint8 (as is), uint16 (0..65535), bool (True = 255) or float ([0, 1]). RGBA arrays are composited
  on white by the same Pillow code as RGBA files, so a candidate gives the same pixels whichever way
  it arrives.

Built on it: `to_rgb_uint8_batch` (a batch, e.g. Kontext sources: (B, H, W, C) arrays or lists;
an ambiguous (2, 32, 32) is refused) and `rgb_encoded` (bytes for storage that decode plainly to
the same pixels). The grep test in ``tests/test_images.py`` keeps this module the only one in
arr_jax that opens images or calls Pillow's mode conversion.

Errors: `ImageDecodeError` (a ``ValueError``) naming the input (the file, or the input's type, and
for arrays dtype and shape; ``name=`` replaces that description), for anything that cannot be
decoded or has an unsupported layout.
"""
from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps

_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # scaled here, not by Pillow's convert
_ARRAY_LAYOUT = "(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) channels last"
_BATCH_LAYOUT = "(B, H, W, 3) (or (B, H, W, 1|4)), or one image (H, W[, 1|3|4])"
WHITE = (255, 255, 255)  # the background transparency is composited on (transformers' convert_to_rgb)


class ImageDecodeError(ValueError):
    """An input could not be decoded as an image (the message names the input)."""


def _describe(src: Any) -> str:
    """How errors name an input: ``file <path>``, ``bytes input (n bytes)``, ``ndarray input <dtype> <shape>``."""
    if isinstance(src, (str, os.PathLike)):
        return f"file {os.fspath(src)}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"{type(src).__name__} input ({len(src)} bytes)"
    if isinstance(src, Image.Image):
        return f"PIL image (mode {src.mode}, {src.width}x{src.height})"
    if hasattr(src, "shape") and hasattr(src, "dtype"):
        return f"{type(src).__name__} input {src.dtype} {tuple(src.shape)}"
    return f"{type(src).__name__} input"


def to_rgb_uint8(src: Any, *, name: str | None = None) -> np.ndarray:
    """``src`` (path, encoded bytes, PIL image or array; see the module docstring) -> uint8 (H, W, 3) RGB.

    Transparency is composited on white; 16-bit and float images are scaled to 0..255. Raises
    `ImageDecodeError` (a ValueError) naming the input (``name``, else its path / type, dtype and
    shape) when it cannot be decoded, is an array of another layout than ``(H, W[, 1|3|4])`` or
    another dtype than uint8 / uint16 / bool / float, or holds values outside its dtype's range.
    """
    what = name or _describe(src)
    try:
        if isinstance(src, Image.Image):
            return _decode(lambda: src, what, close=False)
        if isinstance(src, (str, os.PathLike)):
            if not os.path.isfile(src):
                raise ImageDecodeError(f"could not decode {what} as an image: no such file")
            return _decode(lambda: Image.open(src), what)
        if isinstance(src, (bytes, bytearray, memoryview)):
            data = bytes(src)
            return _decode(lambda: Image.open(io.BytesIO(data)), what)
        if isinstance(src, np.ndarray) or hasattr(src, "__array__"):
            return _from_array(np.asarray(src), what)
    except ImageDecodeError:
        raise
    except ValueError as e:  # a value problem found below (range, layout): name the input
        raise ImageDecodeError(f"could not decode {what} as an image: {e}") from None
    raise ImageDecodeError(f"cannot make an image from {what}: expected a file path, encoded bytes, a PIL image "
                           f"or an array {_ARRAY_LAYOUT}")


def to_rgb_uint8_batch(src: Any, *, name: str = "images") -> np.ndarray:
    """A batch of images -> uint8 (B, H, W, 3), each through `to_rgb_uint8`.

    ``src``: an array (B, H, W, C) with C in {1, 3, 4}, or one image array (H, W) / (H, W, C) (a
    batch of one); or a list / tuple of anything `to_rgb_uint8` takes (all of one size); or one
    path / bytes / PIL image. A 3-d array whose last axis is no channel count, such as (2, 32, 32),
    is ambiguous and raises `ImageDecodeError` naming the expected layout; so do images of
    different sizes in one list.
    """
    if isinstance(src, (list, tuple)):
        if not src:
            raise ImageDecodeError(f"{name}: no images given")
        out = [to_rgb_uint8(s, name=f"{name}[{i}] ({_describe(s)})") for i, s in enumerate(src)]
        if len({o.shape for o in out}) > 1:
            raise ImageDecodeError(f"{name}: images of one batch must have one size; got "
                                   f"{[o.shape[:2] for o in out]}")
        return np.stack(out)
    if isinstance(src, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        return to_rgb_uint8(src, name=f"{name} ({_describe(src)})")[None]
    arr = np.asarray(src)
    bad = arr.ndim not in (2, 3, 4) or (arr.ndim >= 3 and arr.shape[-1] not in (1, 3, 4))
    if bad:
        raise ImageDecodeError(f"{name}: expected an array {_BATCH_LAYOUT}; got {arr.dtype} {arr.shape}")
    if arr.ndim < 4:
        return to_rgb_uint8(arr, name=f"{name} ({_describe(arr)})")[None]
    if arr.shape[0] == 0:
        raise ImageDecodeError(f"{name}: empty batch {arr.shape}")
    return np.stack([to_rgb_uint8(a, name=f"{name}[{i}] ({_describe(a)})") for i, a in enumerate(arr)])


_KEEP_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


def rgb_encoded(data: bytes, *, name: str | None = None) -> tuple[bytes, str]:
    """Encoded image bytes whose plain Pillow decode (``np.asarray(Image.open(...))``, as tfds and
    most readers do) gives exactly `to_rgb_uint8`'s pixels, and their file extension.

    ``data`` itself (its extension: ``png`` / ``jpg`` / ``webp``) when it is a PNG, JPEG or WebP
    that already decodes to those pixels; otherwise (transparency, EXIF rotation, 16-bit, palette,
    CMYK, other formats ...) a lossless RGB PNG of `to_rgb_uint8` (``png``). Raises
    `ImageDecodeError` naming the input (``name``) when it cannot be decoded.
    """
    data = bytes(data)
    rgb = to_rgb_uint8(data, name=name)
    with Image.open(io.BytesIO(data)) as im:
        fmt = _KEEP_FORMATS.get(im.format or "")
        if fmt is not None and im.mode == "RGB":
            plain = np.asarray(im)
            if plain.shape == rgb.shape and np.array_equal(plain, rgb):
                return data, fmt
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue(), "png"


def _decode(open_fn, what: str, close: bool = True) -> np.ndarray:
    im = None
    try:
        im = open_fn()
        im.load()
        return _from_pil(im, what)
    except ImageDecodeError:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, zlib / struct errors ...
        raise ImageDecodeError(f"could not decode {what} as an image: {type(e).__name__}: {e}") from None
    finally:
        if close and im is not None:
            im.close()


def _from_pil(im: Image.Image, what: str) -> np.ndarray:
    if im.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        im = ImageOps.exif_transpose(im)
    if im.mode in _WIDE_MODES:
        return _from_wide(im, what)
    if im.mode == "La":  # premultiplied: Pillow converts it to LA only
        im = im.convert("LA")
    if im.mode in _ALPHA_MODES or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        rgb = Image.alpha_composite(Image.new("RGBA", im.size, WHITE + (255,)), rgba).convert("RGB")
    else:
        rgb = im.convert("RGB")
    return np.asarray(rgb, np.uint8).copy()


def _from_wide(im: Image.Image, what: str) -> np.ndarray:
    """16-bit / 32-bit integer / float grey Pillow image -> uint8 RGB, scaled (see module docstring)."""
    a = np.asarray(im)
    if im.mode == "F":
        grey = _scale_float(a, what)
    else:
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ImageDecodeError(f"could not decode {what} as an image: mode {im.mode} values span [{lo}, {hi}], "
                                   f"outside the 16-bit range 0..65535, so its bit depth is unknown")
        grey = _scale_uint16(a)
    key = im.info.get("transparency")
    if isinstance(key, (int, float)) and not isinstance(key, bool):  # tRNS grey key: those pixels are clear
        grey = np.where(a == key, np.uint8(WHITE[0]), grey)
    return np.repeat(grey[..., None], 3, axis=-1)


def _scale_uint16(a: np.ndarray) -> np.ndarray:
    return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _scale_float(a: np.ndarray, what: str) -> np.ndarray:
    a = a.astype(np.float64)
    if a.size and np.isnan(a).any():
        raise ImageDecodeError(f"could not decode {what} as an image: float images must hold values in [0, 1]; "
                               f"got NaN")
    if a.size and (a.min() < 0.0 or a.max() > 1.0):
        raise ImageDecodeError(f"could not decode {what} as an image: float images must hold values in [0, 1]; "
                               f"got [{a.min()}, {a.max()}]")
    return np.floor(a * 255.0 + 0.5).astype(np.uint8)


def _from_array(a: np.ndarray, what: str) -> np.ndarray:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))) or 0 in a.shape:
        raise ImageDecodeError(f"could not decode {what} as an image: expected an array {_ARRAY_LAYOUT}")
    if a.dtype == np.uint8:
        u8 = a
    elif a.dtype == np.bool_:
        u8 = a.astype(np.uint8) * np.uint8(255)
    elif a.dtype == np.uint16:
        u8 = _scale_uint16(a)
    elif np.issubdtype(a.dtype, np.floating):
        u8 = _scale_float(a, what)
    else:
        raise ImageDecodeError(f"could not decode {what} as an image: image arrays must be uint8, uint16, bool or "
                               f"float (in [0, 1]); got {a.dtype}")
    u8 = np.ascontiguousarray(u8)
    if u8.ndim == 2:
        return np.repeat(u8[..., None], 3, axis=-1)
    if u8.shape[-1] == 4:
        return _from_pil(Image.fromarray(u8, "RGBA"), what)
    return u8.copy() if u8 is a else u8


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file, read from its header only; `ImageDecodeError` names the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError) as e:
        raise ImageDecodeError(f"could not read the size of image file {path}: {e}") from None
