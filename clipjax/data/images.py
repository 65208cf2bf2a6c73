"""Image decoding and resizing shared by the input pipeline and the evaluation datasets.

Every PIL mode ends up as 8-bit RGB with the pixels a viewer would show:
  * 16-bit images ('I;16', 'I;16B', 'I;16L', and 'I', which is how PIL opens some 16-bit files)
    keep their high byte, v >> 8, as PIL itself does for 16-bit RGB(A) PNGs; 32-bit float ('F')
    images are taken to lie in [0, 1]. PIL's own convert() clips these to 0..255 instead, so a
    16-bit photo came out white and a float one black.
  * Transparent pixels (alpha channels, palette or colour-key transparency) are composited over
    white rather than dropped: the colour hidden under alpha 0 is arbitrary (often black).
  * JPEGs are turned upright by their EXIF orientation tag, as a viewer shows them.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_EXIF_ORIENTATION = 0x0112


def _to_8bit(im: Image.Image) -> Image.Image:
    """High-bit-depth greyscale -> 'L' by the scaling in the module docstring."""
    values = np.asarray(im)
    if im.mode == "F":
        values = np.rint(np.clip(np.nan_to_num(values), 0.0, 1.0) * 255)
    else:
        values = np.clip(values.astype(np.int64), 0, 65535) >> 8
    return Image.fromarray(values.astype(np.uint8))


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in _ALPHA_MODES or "transparency" in im.info


def _over_white(im: Image.Image) -> Image.Image:
    im = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 'RGB' (see the module docstring)."""
    if im.mode in _SIXTEEN_BIT_MODES or im.mode == "F":
        im = _to_8bit(im)
    elif _has_alpha(im):
        im = _over_white(im)
    return im if im.mode == "RGB" else im.convert("RGB")


def square_rgb(im: Image.Image, image_size: int, resample=Image.BICUBIC) -> np.ndarray:
    """RGB, shorter side resized to image_size, centre crop -> uint8 [S, S, 3].

    Cropping rather than stretching keeps object shapes, which the contrastive task depends on.
    """
    s = image_size
    im = to_rgb(im)
    w, h = im.size
    if (w, h) != (s, s):
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), resample)
        left, top = (nw - s) // 2, (nh - s) // 2
        im = im.crop((left, top, left + s, top + s))
    return np.asarray(im, dtype=np.uint8)


def _upright(im: Image.Image) -> Image.Image:
    """`im` turned by its EXIF orientation; unchanged when it has none (or unreadable EXIF)."""
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # pylint: disable=broad-except
        # A malformed EXIF block should not cost an otherwise good image.
        return im
    return ImageOps.exif_transpose(im) if orientation in range(2, 9) else im


def decode_image(data: bytes, image_size: int, resample=Image.BICUBIC) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) -> uint8 [S, S, 3] by `square_rgb`."""
    with Image.open(io.BytesIO(data)) as im:
        # JPEG decodes at a reduced scale directly (never below the size asked for): much faster.
        # The size is square, so it holds whichever way the EXIF orientation turns the image.
        im.draft("RGB", (image_size, image_size))
        return square_rgb(_upright(im), image_size, resample)
