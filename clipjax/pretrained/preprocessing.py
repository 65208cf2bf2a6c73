"""How published models fit an image to their square input, reproduced pixel for pixel.

A converted model records its reference's recipe in `model.image_resize` (the format's name), and
`clipjax.load(...).encode_image` applies it: an image of any size becomes the pixels that the
reference's own preprocessing gives it (tests/test_preprocessing_parity.py compares each recipe
with its reference on odd-sized images: equal, every pixel).

  open_clip  open_clip's evaluation transform (torchvision's Resize and CenterCrop on a PIL image):
             the shorter side resized to S and the longer to int(S * long / short), PIL's bicubic
             filter, then the centred S x S square at offset int(round(extra / 2)) (Python's
             round: halves to even, so an odd margin of 83 starts at 42).
  hf_clip    transformers' CLIPImageProcessor: the same resize, the square at offset extra // 2
             (41 for that margin).
  hf_siglip  transformers' SiglipImageProcessor: the whole image resized to S x S, bicubic, no crop.

Each is PIL's bicubic resize of the whole image (rounded to uint8, without the `reducing_gap`
shortcut) followed by the crop, as the references do it. clipjax's own `crop` and `squash`
(clipjax.data.images, what clipjax-trained models and the data pipeline use) resample only the
kept region, round the longer side to the nearest pixel and shrink by whole-pixel blocks first
for large reductions: on a smooth image under a level apart on average, on a detailed one a
shifted or rescaled crop moves pixels by up to 182 levels of 255 (embeddings by up to 0.064 on
the fixture models).

The benchmark evaluators, which resample while decoding (`clipjax.data.images.decode_image`),
keep the reference's geometry (the centre square, or the whole image for `hf_siglip`), not its
exact pixels.

  hf_siglip2_naflex  transformers' Siglip2ImageProcessor (a NaFlex model): no square, the image
             resized to both sides multiples of the patch at about its aspect ratio, with at most
             max_num_patches patches (PIL bilinear), then cut into patches (`naflex_patches`).

transformers 5's default image processors are the torchvision backend, which resamples uint8
tensors with torch's antialiased bicubic rather than PIL's: on noisy images a few pixels differ
by up to a few levels out of 255 (smooth images: none). The recipes follow PIL, the filter of
open_clip, of transformers' PIL backend (CLIPImageProcessorPil, SiglipImageProcessorPil) and of
the preprocessing the CLIP and SigLIP weights were trained with.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from PIL import Image

from clipjax import paths
from clipjax.data.naflex import naflex_patches  # noqa: F401 - the data layer's, where workers read it
from clipjax.pretrained.layouts import ConversionError

_BICUBIC = 3  # PIL's (and transformers' `resample`) number for the bicubic filter
_BILINEAR = 2
NAFLEX = "hf_siglip2_naflex"  # the recipe of NaFlex models, which gives patches, not a square

# `model.image_resize` values that name a reference's preprocessing -> what it does, in words
# (stored in the checkpoint's meta beside the size and statistics).
RECIPES = {
    "open_clip": "open_clip's: shorter side to image_size, longer int(size * long / short) (PIL bicubic), "
    "centre crop at int(round(margin / 2))",
    "hf_clip": "transformers' CLIPImageProcessor: shorter side to image_size, longer int(size * long / short) "
    "(PIL bicubic), centre crop at margin // 2",
    "hf_siglip": "transformers' SiglipImageProcessor: the whole image to image_size x image_size (PIL bicubic)",
    NAFLEX: "transformers' Siglip2ImageProcessor: aspect kept, sides multiples of the patch, at most "
    "model.image.max_num_patches patches (PIL bilinear)",
}

# clipjax's own (clipjax.data.images), in the same words.
_OWN = {
    "crop": "clipjax's: shorter side to image_size (bicubic), centre crop",
    "squash": "clipjax's: the whole image to image_size x image_size (bicubic)",
}


def describe(resize: str) -> str:
    """`model.image_resize` in words, for the checkpoint's meta."""
    return RECIPES.get(resize) or _OWN[resize]


def resized_size(width: int, height: int, image_size: int, recipe: str) -> tuple[int, int]:
    """(width, height) the reference resizes an image to before cropping."""
    s = image_size
    if recipe == "hf_siglip":
        return s, s
    short, long = min(width, height), max(width, height)
    long = int(s * long / short)  # truncated, as torchvision and transformers compute it
    return (s, long) if width <= height else (long, s)


def _offset(margin: int, recipe: str) -> int:
    # torchvision's CenterCrop: int(round(margin / 2.0)); transformers': int(margin / 2.0).
    return int(round(margin / 2.0)) if recipe == "open_clip" else margin // 2


def fit(im: Image.Image, image_size: int, recipe: str) -> np.ndarray:
    """An RGB (or 'L') PIL image -> uint8 [S, S, 3], as the reference `recipe` preprocesses it."""
    if recipe == NAFLEX:
        raise ValueError(f"{NAFLEX} fits an image to patches, not a square (naflex_patches)")
    if recipe not in RECIPES:
        raise ValueError(f"unknown preprocessing recipe {recipe!r} (known: {', '.join(RECIPES)})")
    s = image_size
    size = resized_size(*im.size, s, recipe)
    if im.size != size:
        im = im.resize(size, Image.BICUBIC)
    if size != (s, s):
        left, top = _offset(size[0] - s, recipe), _offset(size[1] - s, recipe)
        im = im.crop((left, top, left + s, top + s))
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)


def _hf_settings(fmt: str, image_size: int, patch_size: int = 16) -> dict[str, Any]:
    """The preprocessor_config.json settings the recipe of `fmt` reproduces at `image_size` (a
    NaFlex model: `patch_size`); at 224 (patch 16) they are transformers' defaults, which hold for
    what a file leaves out."""
    s = image_size
    square = {"height": s, "width": s}
    common = {"do_resize": True, "resample": _BICUBIC, "do_rescale": True, "do_normalize": True}
    if fmt == NAFLEX:
        return {**common, "resample": _BILINEAR, "patch_size": patch_size}
    if fmt == "hf_siglip":
        return {**common, "size": square, "do_center_crop": False}
    return {**common, "size": {"shortest_edge": s}, "do_center_crop": True, "crop_size": square}


def naflex_processor_settings(spec) -> dict[str, Any]:
    """The preprocessor_config.json of an exported NaFlex model (a `DualEncoderSpec`): transformers'
    Siglip2ImageProcessor with the model's patch size, patch budget and statistics."""
    return {
        "image_processor_type": "Siglip2ImageProcessor",
        **_hf_settings(NAFLEX, 0, spec.image.patch_size),
        "max_num_patches": spec.image.max_num_patches,
        "rescale_factor": 1 / 255,
        "image_mean": list(spec.image_mean),
        "image_std": list(spec.image_std),
    }


def _as_size(name: str, value, fmt: str):
    # Files written by older transformers give sizes as one int: CLIP's `size` is the shorter
    # side, the others a square.
    if isinstance(value, int) and not isinstance(value, bool):
        return (
            {"shortest_edge": value}
            if (fmt, name) == ("hf_clip", "size")
            else {"height": value, "width": value}
        )
    return value


def recipe_keys(fmt: str, checkpoint: str, image_size: int, patch_size: int = 16) -> dict[str, Any]:
    """The config keys of the preprocessing of format `fmt`: `model.image_resize`, and, from a
    Hugging Face folder's preprocessor_config.json, the statistics it gives (and a NaFlex model's
    `max_num_patches`), once the rest of the file is checked to be what the recipe reproduces
    (ConversionError naming the setting otherwise: an import would give other pixels than the
    model's own processor, silently)."""
    keys: dict[str, Any] = {"model.image_resize": fmt}
    path = paths.join(checkpoint, "preprocessor_config.json")
    if fmt == "open_clip" or not paths.isdir(checkpoint) or not paths.exists(path):
        return keys
    try:
        settings = json.loads(paths.read_text(path))
    except ValueError as e:
        raise ConversionError(f"{path} is not valid JSON ({e})") from None
    defaults = _hf_settings(fmt, 224)
    for name, want in _hf_settings(fmt, image_size, patch_size).items():
        got = settings.get(name, defaults[name])
        got = _as_size(name, got, fmt) if name in ("size", "crop_size") else got
        if got != want:
            raise ConversionError(
                f"{path}: {name} is {got!r}; clipjax reproduces {fmt}'s preprocessing with {name} = {want!r} "
                f"(image size {image_size})"
            )
    factor = settings.get("rescale_factor", 1 / 255)
    if not isinstance(factor, (int, float)) or abs(factor * 255 - 1) > 1e-6:
        raise ConversionError(f"{path}: rescale_factor is {factor!r}; clipjax's models read pixels / 255")
    if fmt == NAFLEX:
        budget = settings.get("max_num_patches", 256)  # the processor's default
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ConversionError(f"{path}: max_num_patches is {budget!r}; expected a positive integer")
        keys["model.image.max_num_patches"] = budget
    for name in ("image_mean", "image_std"):
        if name in settings:
            keys[f"model.{name}"] = (
                tuple(settings[name]) if isinstance(settings[name], list) else settings[name]
            )
    return keys
