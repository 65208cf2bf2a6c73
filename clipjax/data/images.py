"""Image decoding and resizing shared by the input pipeline and the evaluation datasets."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def square_rgb(im: Image.Image, image_size: int, resample=Image.BICUBIC) -> np.ndarray:
    """RGB, shorter side resized to image_size, centre crop -> uint8 [S, S, 3].

    Cropping rather than stretching keeps object shapes, which the contrastive task depends on.
    """
    s = image_size
    im = im.convert("RGB")
    w, h = im.size
    if (w, h) != (s, s):
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), resample)
        left, top = (nw - s) // 2, (nh - s) // 2
        im = im.crop((left, top, left + s, top + s))
    return np.asarray(im, dtype=np.uint8)


def decode_image(data: bytes, image_size: int, resample=Image.BICUBIC) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) -> uint8 [S, S, 3] by `square_rgb`."""
    with Image.open(io.BytesIO(data)) as im:
        # JPEG decodes at a reduced scale directly (never below the size asked for): much faster.
        im.draft("RGB", (image_size, image_size))
        return square_rgb(im, image_size, resample)
