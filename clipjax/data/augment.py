"""SimCLR's image augmentations, batched on device and fixed by (seed, step, index, view).

The image-image (SimCLR) mode needs two random views of every training image in each step. They
are drawn inside the jitted train step from the uint8 batch the pipeline delivers (already at
the training resolution), so the host only decodes. Each example is augmented by `augment_one`
under `jax.vmap`, with its own key

    fold_in(fold_in(fold_in(PRNGKey(seed), step), index), view)

where `index` is the example's position in the dataset. A view therefore depends on those four
numbers only: not on the batch size or order, the mesh or the device that holds the example,
and a resumed run draws the views it would have drawn. To keep that true to the last bit, no
sum is left to XLA, which orders the additions of a reduction by the shape it compiles for (a
batch of 2 per device sums differently from a batch of 16): the contrast op's mean is summed as
fixed-point integers, and the blur adds its taps in a written order. The key gives one vector of
uniforms per example (one threefry call; a split per draw cost seconds of compile time), each
draw in a fixed slot, so switching one op off leaves the others' draws alone. Every op is
computed for every example and kept or dropped with `jnp.where` (under vmap a `lax.cond` on a
batched predicate is the same select); only the config, which is static, removes ops at trace
time.

The ops, in the order they run (SimCLR's), each clipping its output to [0, 1]:

  * random resized crop: a box of a share of the area uniform in `crop_scale` and a
    log-uniform aspect ratio in `crop_ratio`, placed uniformly; ten candidates are drawn at
    once and the first that fits is used (the centred box of the nearest allowed aspect if none
    does), as in `clipjax.data.images.random_resized_crop_box`. The box is continuous (not
    snapped to pixels) and resampled back to H x W bilinearly, one axis at a time, pixel
    centres at +0.5, coordinates clamped at the edges, no antialiasing: each output row is a
    blend of two gathered input rows, then each column likewise. The full box samples every
    pixel at its own centre, so crop_scale=(1, 1), crop_ratio=(1, 1) is the identity. The
    horizontal flip reverses the column taps and costs nothing more.
  * colour jitter (probability `color_jitter`): brightness x*f, contrast f*x + (1-f)*mean gray,
    saturation f*x + (1-f)*gray, with f uniform in [max(0, 1-s), 1+s] for strength s, and a hue
    shift uniform in [-hue, hue] of a full turn, applied in a random order per example (a
    uniform permutation of the four). Under vmap a `lax.switch` per step would compute all four
    ops at each of four steps; instead the three blends share one form, clip(a*x + b*gray +
    c*mean gray), and hue, the costly one, runs once: three blend steps for the ops drawn
    before it, hue, three for those after (a step on the wrong side of hue is the identity
    blend). The hue shift goes through HSV, as torchvision's `adjust_hue`: hue from RGB,
    shifted, RGB rebuilt from (hue, max, chroma). It keeps value and saturation, leaves grays
    unchanged and is the identity (to float rounding) for a shift of 0 or a full turn.
  * illumination (probability `illumination`, off by default; not one of SimCLR's ops): a light
    ramp added along a uniform direction, from -a to +a across the image with a uniform in
    [0, `ramp`], times a radial falloff 1 - f r^2 (r = 1 at the corners) with f uniform in
    [0, `falloff`]. It varies what a lamp and a lens do to a picture, the gradient and the
    vignette of the embedded data's nuisance factors, which no SimCLR op changes. Its four
    uniforms come from fold_in(key, 1), so switching it on leaves every other op's draws alone.
  * grayscale (probability `grayscale`): 0.299 R + 0.587 G + 0.114 B on all three channels.
  * Gaussian blur (probability `blur`): separable, reflect padding, a kernel of 2r+1 taps with
    r = int(0.1 * side) // 2 (23 taps at 224 px, 3 at 32 px), side the shorter image side. The
    sigma range `blur_sigma` is in pixels of a 224 px image and is scaled by side/224, so the
    blur covers the same share of the picture at any resolution; at 32 px the default range
    becomes 0.014-0.29 px, which barely changes the image (SimCLR drops blur for CIFAR anyway).
  * solarize (probability `solarize`): pixels >= 0.5 become 1 - x (BYOL's second view: 0.2).

Cost: elementwise work and gathers, no matmuls (a crop as two interpolation matmuls costs H + W
multiply-adds a value, and a matmul's order of additions is the library's). On 2 CPU cores two
views of 256 images of 32 px take a few tens of ms; at 224 px the blur's 46 taps a value
dominate. The op functions (`resized_crop`, `adjust_hue`, `gaussian_blur`, ...) take explicit
parameters so that tests can check them against numpy; `augment_batch` runs given keys.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from clipjax.schema import Field, Section

GRAY_WEIGHTS = (0.299, 0.587, 0.114)
# The blur's sigma range is given for this image side (SimCLR's ImageNet recipe).
BLUR_REFERENCE_SIDE = 224
# Candidate boxes per crop; a miss needs a box larger than the image in one direction, which at
# the default scale and ratio happens to few draws, so ten all missing is rare.
CROP_TRIES = 10
# A crop's uniforms: the shares and aspects of the candidates, then the place of the box.
CROP_DRAWS = 2 * CROP_TRIES + 2


def _probability(value) -> str | None:
    return None if 0.0 <= value <= 1.0 else "expected a probability in [0, 1]"


def _positive_range(value) -> str | None:
    if len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        return "expected (low, high)"
    if not 0 < value[0] <= value[1]:
        return "expected 0 < low <= high"
    return None


def _area_range(value) -> str | None:
    problem = _positive_range(value)
    if problem is None and value[1] > 1:
        return "expected 0 < low <= high <= 1, shares of the image area"
    return problem


def _hue(value) -> str | None:
    return None if 0.0 <= value <= 0.5 else "expected a share of a turn in [0, 0.5]"


def _p(default, doc):
    return Field(default, doc, check=_probability)


# `config.augment.*`: the defaults are SimCLR's ImageNet recipe (colour strength 0.5).
SECTION = Section(
    {
        "crop_scale": Field(
            (0.08, 1.0), "random resized crop: range of the box's share of the area", check=_area_range
        ),
        "crop_ratio": Field(
            (3 / 4, 4 / 3),
            "random resized crop: range of the box's aspect ratio (w/h)",
            check=_positive_range,
        ),
        "flip": _p(0.5, "probability of a horizontal flip"),
        "color_jitter": _p(0.8, "probability of colour jitter (the four ops below, in a random order)"),
        "brightness": Field(0.4, "jitter: brightness factor uniform in [1-s, 1+s]", minimum=0.0),
        "contrast": Field(0.4, "jitter: contrast factor uniform in [1-s, 1+s]", minimum=0.0),
        "saturation": Field(0.4, "jitter: saturation factor uniform in [1-s, 1+s]", minimum=0.0),
        "hue": Field(0.1, "jitter: hue shift uniform in [-s, s] of a full turn", check=_hue),
        "grayscale": _p(0.2, "probability of converting to grayscale"),
        "blur": _p(0.5, "probability of a Gaussian blur"),
        "blur_sigma": Field(
            (0.1, 2.0), "blur sigma range, in pixels at 224 px (scaled by side/224)", check=_positive_range
        ),
        "solarize": _p(0.0, "probability of solarizing (x >= 0.5 becomes 1 - x)"),
        "illumination": _p(
            0.0, "probability of a random illumination: a linear ramp and a radial falloff (not SimCLR's)"
        ),
        "ramp": Field(
            0.1, "illumination: ramp from -a to +a across the image, a uniform in [0, s]", minimum=0.0
        ),
        "falloff": Field(
            0.45, "illumination: x * (1 - f * r^2), r = 1 at the corners, f uniform in [0, s]", minimum=0.0
        ),
    },
    doc="SimCLR augmentations of the image-image mode, drawn on device per (seed, step, index, view)",
)


# ---------------------------------------------------------------------------------------------
# The ops, on one float32 [H, W, 3] image in [0, 1].


def _clip(x):
    return jnp.clip(x, 0.0, 1.0)


def _ordered_sum(values: list):
    """The sum of a list of arrays, added in a fixed pairwise order."""
    while len(values) > 1:
        pairs = [a + b for a, b in zip(values[0::2], values[1::2])]
        values = pairs + values[len(pairs) * 2 :]
    return values[0]


def _exact_mean(values):
    """The mean of values in [0, 1], the same to the last bit whatever the batch around it.

    `jnp.mean` leaves the order of the additions to XLA, which picks it by the shape it
    compiles for: the same example then sums differently in a batch of 2 per device than in a
    batch of 16, and its view would differ in the last bit between meshes. Integers add exactly
    in any order, so the values are summed as fixed point, with as many fraction bits as keep
    the total below 2^30: 2^-20 at 32 x 32, 2^-14 at 224 x 224, far below a colour step.
    """
    n = values.size
    bits = 30 - (n - 1).bit_length()
    fixed = jnp.round(values * float(2**bits)).astype(jnp.int32)
    return jnp.sum(fixed).astype(jnp.float32) * float(2.0**-bits) / n


def _sample_points(start, length, size: int):
    """Bilinear taps along one axis of an output that spans input coordinates
    [start, start + length): for each output pixel, its two input pixels and the weight of the
    second."""
    out = jnp.arange(size, dtype=jnp.float32)
    # Pixel centres at +0.5 on both sides: output i samples the input at this coordinate.
    src = jnp.clip(start + (out + 0.5) * (length / size) - 0.5, 0.0, size - 1.0)
    lo = jnp.floor(src)
    frac = src - lo
    lo = lo.astype(jnp.int32)
    return lo, jnp.minimum(lo + 1, size - 1), frac


def _lerp(image, axis: int, taps):
    lo, hi, frac = taps
    shape = [1] * image.ndim
    shape[axis] = frac.shape[0]
    frac = frac.reshape(shape)
    a = jnp.take(image, lo, axis=axis, mode="clip")
    b = jnp.take(image, hi, axis=axis, mode="clip")
    return (1.0 - frac) * a + frac * b


def resized_crop(image, box, flip=False):
    """The box (top, left, height, width), in pixels, resampled bilinearly to the image's size;
    mirrored left-right when `flip` (a bool, possibly traced)."""
    h, w = image.shape[0], image.shape[1]
    top, left, height, width = box
    cols = _sample_points(left, width, w)
    cols = tuple(jnp.where(flip, c[::-1], c) for c in cols)
    return _clip(_lerp(_lerp(image, 0, _sample_points(top, height, h)), 1, cols))


def _between(u, lo, hi):
    return lo + (hi - lo) * u


def crop_box(u, height: int, width: int, scale, ratio):
    """(top, left, box height, box width) from CROP_DRAWS uniforms in [0, 1): see the module
    docstring."""
    share = _between(u[:CROP_TRIES], scale[0], scale[1])
    aspect = jnp.exp(_between(u[CROP_TRIES : 2 * CROP_TRIES], math.log(ratio[0]), math.log(ratio[1])))
    area = float(height * width)
    ws = jnp.sqrt(area * share * aspect)
    hs = jnp.sqrt(area * share / aspect)
    fits = (ws <= width) & (hs <= height)
    first = jnp.argmax(fits)
    # The fallback: the largest centred box whose aspect is allowed.
    fallback_aspect = min(max(width / height, ratio[0]), ratio[1])
    fw = min(width, height * fallback_aspect)
    fh = min(height, width / fallback_aspect)
    found = fits.any()
    bw = jnp.where(found, ws[first], fw)
    bh = jnp.where(found, hs[first], fh)
    top = jnp.where(found, u[2 * CROP_TRIES] * (height - bh), (height - fh) / 2)
    left = jnp.where(found, u[2 * CROP_TRIES + 1] * (width - bw), (width - fw) / 2)
    return top, left, bh, bw


def random_crop_box(key, height: int, width: int, scale, ratio):
    """`crop_box` with uniforms drawn from `key`."""
    return crop_box(jax.random.uniform(key, (CROP_DRAWS,)), height, width, scale, ratio)


def grayscale(image):
    """[H, W] luminance."""
    r, g, b = GRAY_WEIGHTS
    return r * image[..., 0] + g * image[..., 1] + b * image[..., 2]


def to_grayscale(image):
    return jnp.repeat(grayscale(image)[..., None], 3, axis=-1)


def _blend(image, a, b, c):
    """clip(a * x + b * gray(x) + c * mean gray): brightness, contrast and saturation are each
    this map with their own (a, b, c), so one random-order step computes one map, not three."""
    gray = grayscale(image)
    return _clip(a * image + b * gray[..., None] + c * _exact_mean(gray))


def adjust_brightness(image, factor):
    return _blend(image, factor, 0.0, 0.0)


def adjust_contrast(image, factor):
    return _blend(image, factor, 0.0, 1.0 - factor)


def adjust_saturation(image, factor):
    return _blend(image, factor, 1.0 - factor, 0.0)


def _wrap6(x):
    return x - 6.0 * jnp.floor(x / 6.0)


def adjust_hue(image, shift):
    """Rotate the hue by `shift` of a full turn (HSV hue; value and saturation kept)."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    # The largest channel is picked by comparing the channels with each other, not with a max
    # computed apart: XLA may compute a fused input twice with different roundings (an FMA in
    # one place and not the other), and a pixel whose max equals none of its channels would
    # get the hue of the wrong sector.
    is_r = (r >= g) & (r >= b)
    is_g = ~is_r & (g >= b)
    high = jnp.where(is_r, r, jnp.where(is_g, g, b))
    chroma = high - jnp.minimum(r, jnp.minimum(g, b))
    inverse = 1.0 / jnp.where(chroma > 0, chroma, 1.0)
    # Hue in sixths of a turn, in [-1, 5), by which channel is largest; 0 for grays.
    hue = jnp.where(
        is_r, (g - b) * inverse, jnp.where(is_g, (b - r) * inverse + 2.0, (r - g) * inverse + 4.0)
    )
    hue = _wrap6(hue + 6.0 * shift)
    # HSV -> RGB in closed form: channel n is high - chroma * clip(min(k, 4 - k), 0, 1) with
    # k = (n + hue) mod 6, n = 5, 3, 1 for R, G, B. (floor, not fmod: several times cheaper.)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = n + hue
        k = jnp.where(k >= 6.0, k - 6.0, k)
        channels.append(high - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
    return _clip(jnp.stack(channels, axis=-1))


def blur_radius(height: int, width: int) -> int:
    """Half the kernel: its 2r+1 taps span about a tenth of the shorter side."""
    return max(1, int(0.1 * min(height, width)) // 2)


def gaussian_blur(image, sigma, radius: int):
    """Separable Gaussian of `sigma` pixels over 2*radius+1 taps, reflect padding."""
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    weights = jnp.exp(-0.5 * jnp.square(taps / sigma))
    weights = weights / _ordered_sum([weights[t] for t in range(2 * radius + 1)])
    h, w = image.shape[0], image.shape[1]
    padded = jnp.pad(image, ((radius, radius), (0, 0), (0, 0)), mode="reflect")
    out = _ordered_sum([weights[t] * padded[t : t + h] for t in range(2 * radius + 1)])
    padded = jnp.pad(out, ((0, 0), (radius, radius), (0, 0)), mode="reflect")
    return _clip(_ordered_sum([weights[t] * padded[:, t : t + w] for t in range(2 * radius + 1)]))


def solarize(image, threshold=0.5):
    return jnp.where(image >= threshold, 1.0 - image, image)


def illuminate(image, angle, ramp, falloff):
    """clip((x + ramp * d) * (1 - falloff * r^2)): a light ramp of slope `ramp` per half side
    along the direction `angle` (radians; d is -1..1 across the image along it, through the
    centre) and a radial falloff, r^2 = 1 at the corner pixels' centres. Elementwise: no sum."""
    h, w = image.shape[0], image.shape[1]
    y = ((jnp.arange(h, dtype=jnp.float32) + 0.5) / h * 2.0 - 1.0)[:, None]
    x = ((jnp.arange(w, dtype=jnp.float32) + 0.5) / w * 2.0 - 1.0)[None, :]
    direction = jnp.cos(angle) * x + jnp.sin(angle) * y
    corner = (1.0 / h - 1.0) ** 2 + (1.0 / w - 1.0) ** 2
    r2 = (jnp.square(x) + jnp.square(y)) / corner
    light = (1.0 - falloff * r2)[..., None]
    return _clip((image + ramp * direction[..., None]) * light)


# ---------------------------------------------------------------------------------------------
# The random pipeline.


def settings(config) -> dict:
    """`config.augment` checked and completed with the defaults (a plain dict of Python values)."""
    return SECTION.read(config, "augment")


class _Settings(dict):
    """Settings already read, so that each layer does not check them again."""


def _read(config) -> _Settings:
    return config if isinstance(config, _Settings) else _Settings(settings(config))


# An example's random numbers are one vector of uniforms in [0, 1), one threefry call: drawing
# each from its own split of the key took XLA:CPU seconds more to compile (a loop per draw).
# Each draw has a fixed slot, so turning an op off does not move the others.
_CROP = 0
_FLIP = _CROP + CROP_DRAWS
_JITTER = _FLIP + 1  # the coin, then brightness, contrast, saturation, hue, then 4 for the order
_GRAY = _JITTER + 9
_BLUR = _GRAY + 1  # the coin, then sigma
_SOLARIZE = _BLUR + 2
_NUM_DRAWS = _SOLARIZE + 1
# fold_in(key, this) draws the illumination's four uniforms (coin, angle, ramp, falloff).
_ILLUMINATION_KEY = 1


_IDENTITY = (1.0, 0.0, 0.0)


def _jitter(image, u, s):
    """Brightness, contrast, saturation and hue in a random order, from 8 uniforms.

    Under vmap a `lax.switch` on each example's op computes every op at every step. The hue op
    costs several times the others, so it runs once: the ops placed before it run as three
    blend steps (a step past hue's place is the identity), then hue, then the ops after it as
    three more. Six cheap blends and one hue, where four switched steps would cost four of each.
    """

    def factor(v, strength):
        return _between(v, max(0.0, 1.0 - strength), 1.0 + strength)

    fb, fc, fs = factor(u[0], s["brightness"]), factor(u[1], s["contrast"]), factor(u[2], s["saturation"])
    # (a, b, c) of `_blend` for ops 0, 1, 2; op 3 (hue) is the identity blend.
    coefficients = jnp.stack(
        [
            jnp.stack([fb, 0.0, 0.0]),
            jnp.stack([fc, 0.0, 1.0 - fc]),
            jnp.stack([fs, 1.0 - fs, 0.0]),
            jnp.asarray(_IDENTITY),
        ]
    )
    # The ranks of four uniforms: a uniform permutation (ties have probability ~2^-23).
    order = jnp.argsort(u[4:8])
    hue_at = jnp.argmax(order == 3)

    def blends(x, steps, before_hue: bool):
        def body(x, i):
            active = i < hue_at if before_hue else i > hue_at
            a, b, c = jnp.where(active, coefficients[order[i]], jnp.asarray(_IDENTITY))
            return _blend(x, a, b, c), None

        # A loop, not three copies: XLA compiles the blend once (a third of the compile time).
        return jax.lax.scan(body, x, jnp.asarray(steps))[0]

    image = blends(image, (0, 1, 2), True)
    if s["hue"] > 0:
        image = adjust_hue(image, _between(u[3], -s["hue"], s["hue"]))
    return blends(image, (1, 2, 3), False)


def augment_one(image, key, config):
    """One float32 [H, W, 3] image in [0, 1] and its key -> its view (what vmap runs)."""
    s = _read(config)
    h, w = image.shape[0], image.shape[1]
    u = jax.random.uniform(key, (_NUM_DRAWS,))
    box = crop_box(u[_CROP:], h, w, s["crop_scale"], s["crop_ratio"])
    image = resized_crop(image, box, flip=u[_FLIP] < s["flip"])
    if s["color_jitter"] > 0:
        jittered = _jitter(image, u[_JITTER + 1 :], s)
        image = jnp.where(u[_JITTER] < s["color_jitter"], jittered, image)
    if s["illumination"] > 0:
        # Its own draws, from a key of its own: SimCLR's ops keep the uniforms they had before
        # this op existed, so runs without it are unchanged to the bit.
        v = jax.random.uniform(jax.random.fold_in(key, _ILLUMINATION_KEY), (4,))
        lit = illuminate(image, 2.0 * math.pi * v[1], s["ramp"] * v[2], s["falloff"] * v[3])
        image = jnp.where(v[0] < s["illumination"], lit, image)
    if s["grayscale"] > 0:
        image = jnp.where(u[_GRAY] < s["grayscale"], to_grayscale(image), image)
    if s["blur"] > 0:
        lo, hi = s["blur_sigma"]
        scale = min(h, w) / BLUR_REFERENCE_SIDE
        blurred = gaussian_blur(image, _between(u[_BLUR + 1], lo * scale, hi * scale), blur_radius(h, w))
        image = jnp.where(u[_BLUR] < s["blur"], blurred, image)
    if s["solarize"] > 0:
        image = jnp.where(u[_SOLARIZE] < s["solarize"], solarize(image), image)
    return image


def augment_batch(images, keys, config):
    """Float32 [B, H, W, 3] images in [0, 1] and [B] keys -> their views."""
    s = _read(config)
    return jax.vmap(lambda x, k: augment_one(x, k, s))(images, keys)


def example_keys(index, *, seed, step, view):
    """[B] keys: fold_in(fold_in(fold_in(PRNGKey(seed), step), index_i), view)."""
    base = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, i), view))(index)


def augment_views(images, index, *, seed, step, config, num_views=2) -> tuple[jax.Array, ...]:
    """uint8 [B, H, W, 3] images -> num_views float32 [B, H, W, 3] arrays in [0, 1], each view of
    example i drawn from the key fold_in(fold_in(fold_in(PRNGKey(seed), step), index_i), view)."""
    s = _read(config)
    floats = images.astype(jnp.float32) / 255.0
    return tuple(
        augment_batch(floats, example_keys(index, seed=seed, step=step, view=v), s) for v in range(num_views)
    )
