"""Image decoding, cropping and resizing shared by the input pipeline and the evaluation datasets.

Every PIL mode ends up as 8-bit RGB with the pixels a viewer would show:
  * 16-bit images ('I;16', 'I;16B', 'I;16L', and 'I', which is how PIL opens some 16-bit files)
    keep their high byte, v >> 8, as PIL itself does for 16-bit RGB(A) PNGs; 32-bit float ('F')
    images are taken to lie in [0, 1]. PIL's own convert() clips these to 0..255 instead, so a
    16-bit photo came out white and a float one black.
  * Transparent pixels (alpha channels, palette or colour-key transparency) are composited over
    white rather than dropped: the colour hidden under alpha 0 is arbitrary (often black), and a
    logo or a product cut-out on a transparent background is shown on white by every viewer.
  * CMYK (and other colour spaces) are converted by PIL; greyscale becomes three equal channels.
  * Images are turned upright by their EXIF orientation tag, as a viewer shows them.

Geometry: the centre crop (evaluation, and training by default) resizes the shorter side to the
output size S and keeps the centred S x S square; the random-resized crop (training, with
`data.random_resized_crop`) picks a region of a random share of the area and aspect ratio and
resizes it to S x S (a NaFlex model's training inputs: the whole image or that region, resized
at about its aspect ratio, clipjax.data.naflex). Either way only the region is resampled (PIL's
`resize(box=...)`), with a bicubic filter (NaFlex: bilinear) whose support widens with the scale
factor (antialiased), and a JPEG is decoded straight at a reduced scale (PIL's `draft`: libjpeg's DCT
scaling, 1/2, 1/4 or 1/8) when the region would still span at least S pixels: a 448-512 px JPEG
becomes a 224 px input about 1.7 times as fast (benchmarks/data_throughput.py).
"""

from __future__ import annotations

import io
import math
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_EXIF_ORIENTATION = 0x0112
# EXIF orientations 5-8 turn the image by a quarter: the stored width is the upright height.
_TRANSPOSING = (5, 6, 7, 8)
# For downscaling by 6x or more, PIL first averages whole pixel blocks (`Image.reduce`) and then
# resamples by at most 3x: much faster, and PIL documents the result as indistinguishable.
_REDUCING_GAP = 3.0
# The random-resized crop's aspect-ratio range (width / height), the usual one for this crop.
CROP_RATIO = (3 / 4, 4 / 3)

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in pixels of the upright image
# (width, height) of the upright image -> the region that becomes the S x S output.
CropFn = Callable[[int, int], Box]


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


def _rgb_or_grey(im: Image.Image) -> Image.Image:
    """'RGB' or 'L' with the pixels of the module docstring: the modes PIL resamples directly.

    Greyscale stays 'L' through the resize (a third of the work of RGB) and is spread to three
    channels after it.
    """
    if im.mode in _SIXTEEN_BIT_MODES or im.mode == "F":
        return _to_8bit(im)
    if _has_alpha(im):
        im = _over_white(im)
    return im if im.mode in ("RGB", "L") else im.convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 'RGB' (see the module docstring)."""
    im = _rgb_or_grey(im)
    return im if im.mode == "RGB" else im.convert("RGB")


def center_crop_box(width: int, height: int, image_size: int) -> Box:
    """The region that resizing the shorter side to `image_size` and cropping the centred square
    keeps, in source pixels: resampling only it gives the same pixels as resize-then-crop.

    Cropping rather than stretching keeps object shapes, which the contrastive task depends on.
    """
    s = image_size
    scale = s / min(width, height)
    nw, nh = max(s, round(width * scale)), max(s, round(height * scale))
    left, top = (nw - s) // 2, (nh - s) // 2
    sx, sy = width / nw, height / nh
    return (left * sx, top * sy, (left + s) * sx, (top + s) * sy)


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float] = CROP_RATIO,
) -> Box:
    """A region covering a share of the area uniform in `scale`, with a log-uniform aspect ratio
    in `ratio`, placed uniformly in the image.

    A draw that does not fit (a wide image and a large share) is drawn again; after ten misses
    (rare unless the image's own aspect is far outside `ratio`) the result is the largest centred
    region whose aspect lies in `ratio`.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if w <= width and h <= height:
            left, top = rng.uniform(0.0, width - w), rng.uniform(0.0, height - h)
            return (left, top, left + w, top + h)
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = min(width, height * aspect), min(height, width / aspect)
    left, top = (width - w) / 2, (height - h) / 2
    return (left, top, left + w, top + h)


def check_crop_scale(scale) -> str | None:
    """What is wrong with a `data.random_resized_crop` value, or None: () or (low, high)."""
    if len(scale) == 0:
        return None
    if len(scale) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in scale):
        return "expected () or (low, high), shares of the image area"
    if not 0 < scale[0] <= scale[1] <= 1:
        return "expected 0 < low <= high <= 1"
    return None


# `model.image_resize` values that keep the whole image, squashed to the square (SigLIP's
# preprocessing, and clipjax's own `squash`; a NaFlex model's square inputs); the others keep the
# centre square.
WHOLE_IMAGE_RESIZES = ("squash", "hf_siglip", "hf_siglip2_naflex")


def whole_image(width: int, height: int) -> Box:
    """The `crop(width, height)` that keeps the whole image."""
    return (0, 0, width, height)


def fit_crop(resize: str):
    """The `crop(width, height)` of `decode_image` for `model.image_resize`: None (the centre
    square, the default) for 'crop' (and the references that crop); the whole image for those of
    `WHOLE_IMAGE_RESIZES`."""
    return whole_image if resize in WHOLE_IMAGE_RESIZES else None


def square_rgb(
    im: Image.Image, image_size: int, resample=Image.BICUBIC, box: Box | None = None
) -> np.ndarray:
    """Any mode -> uint8 [S, S, 3]: `box` (default: `center_crop_box`) resized to S x S."""
    s = image_size
    return region_rgb(im, (s, s), resample, center_crop_box(*im.size, s) if box is None else box)


def region_rgb(im: Image.Image, size: tuple[int, int], resample, box: Box) -> np.ndarray:
    """Any mode -> uint8 [height, width, 3]: `box` resized to `size` (width, height)."""
    im = _rgb_or_grey(im)
    if im.size != size or box != (0, 0, *size):
        im = im.resize(size, resample, box=box, reducing_gap=_REDUCING_GAP)
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1: upright); read from the header, before any pixel is decoded."""
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # pylint: disable=broad-except
        # A malformed EXIF block should not cost an otherwise good image.
        return 1
    return orientation if orientation in range(1, 9) else 1


def box_in_region(box, size: tuple[int, int], region: Box) -> np.ndarray:
    """An object's box (x_min, y_min, x_max, y_max, fractions of the image's width and height)
    as fractions of the `region` of that image (pixels) that became the output, clipped to it:
    float32 [4], all zeros where no part of the box is left (the object was cropped away)."""
    width, height = size
    left, top, right, bottom = region
    x = (np.array([box[0], box[2]]) * width - left) / (right - left)
    y = (np.array([box[1], box[3]]) * height - top) / (bottom - top)
    out = np.clip(np.array([x[0], y[0], x[1], y[1]], np.float32), 0.0, 1.0)
    return out if out[2] > out[0] and out[3] > out[1] else np.zeros(4, np.float32)


def bad_box(box) -> bool:
    """A box that is not four finite fractions with x_min <= x_max and y_min <= y_max."""
    b = np.asarray(box, np.float64)
    if b.shape != (4,) or not np.all(np.isfinite(b)):
        return True
    return bool(np.any(b < 0.0) or np.any(b > 1.0) or b[0] > b[2] or b[1] > b[3])


def decode_image(
    data: bytes, image_size: int, resample=Image.BICUBIC, crop: CropFn | None = None
) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, WebP, GIF, TIFF, ...) -> uint8 [S, S, 3], upright.

    `crop(width, height)` picks the region of the upright image that becomes the output (default:
    the centre crop). It is called with the full size even when the JPEG is then decoded at a
    reduced scale, so the region chosen does not depend on how the image was decoded.
    """
    s = image_size
    return decode_region(
        data, crop, lambda w, h: [(s, s)], lambda im, box, _: square_rgb(im, s, resample, box)
    )


def decode_region(
    data: bytes,
    crop: CropFn | None,
    sizes: Callable[[float, float], list[tuple[int, int]]],
    fit: Callable[[Image.Image, Box | None, list[tuple[int, int]]], Any],
) -> Any:
    """Encoded image bytes -> `fit(image, region, sizes)`: the upright image (a JPEG decoded at a
    reduced scale where the region keeps enough pixels), the region `crop(width, height)` of it
    in its pixels (None without `crop`: `fit` takes the centre square) and the (width, height)
    sizes the region becomes, `sizes(region width, region height)` in the full image's pixels.
    """
    with Image.open(io.BytesIO(data)) as im:
        orientation = _orientation(im)
        turned = orientation in _TRANSPOSING
        width, height = im.size[::-1] if turned else im.size
        box = None if crop is None else crop(width, height)
        out = sizes(width, height) if box is None else sizes(box[2] - box[0], box[3] - box[1])
        largest = (max(w for w, _ in out), max(h for _, h in out))
        if box is None:
            # The shorter side must keep at least S pixels; the square holds whichever way the
            # image is turned.
            need = largest
        else:
            # The region must keep at least the output's pixels each way: the whole image must
            # keep this much.
            bw, bh = max(box[2] - box[0], 1e-6), max(box[3] - box[1], 1e-6)
            need = (math.ceil(largest[0] * width / bw), math.ceil(largest[1] * height / bh))
            if turned:
                need = need[::-1]
        # Only JPEG implements draft (others return None and decode in full). It must be asked
        # before the first pixel is read; it keeps the mode: CMYK and greyscale are converted below.
        stored_width = im.size[0]
        drafted = im.draft(im.mode, need)
        # draft answers with the original image's extent in reduced pixels, (0, 0, w / k, h / k).
        factor = drafted[1][2] / stored_width if drafted else 1.0
        if orientation != 1:
            im = ImageOps.exif_transpose(im)
        if box is not None:
            box = tuple(v * factor for v in box)
        return fit(im, box, out)
