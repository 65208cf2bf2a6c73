"""On-device SimCLR augmentations (clipjax/data/augment.py): views fixed by (seed, step, index,
view) whatever the batch layout or mesh, each op against a numpy computation written here, and
the frequencies of the random choices."""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clipjax.data import augment
from clipjax.schema import ConfigError

# Every random op off and the crop the whole image: the pipeline is the identity.
OFF = dict(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    flip=0.0,
    color_jitter=0.0,
    grayscale=0.0,
    blur=0.0,
    solarize=0.0,
)
# Everything on and strong, so clipping and the HSV round trip are exercised.
STRONG = dict(
    color_jitter=1.0,
    brightness=0.9,
    contrast=0.9,
    saturation=0.9,
    hue=0.5,
    grayscale=0.3,
    blur=1.0,
    blur_sigma=(1.0, 8.0),
    solarize=0.5,
    illumination=0.5,
    ramp=0.5,
    falloff=0.9,
)

_COMPILED = {}
# The ops compiled whole: run eagerly, each of their primitives would be compiled on its own.
_crop = jax.jit(augment.resized_crop)
_brightness = jax.jit(augment.adjust_brightness)
_contrast = jax.jit(augment.adjust_contrast)
_saturation = jax.jit(augment.adjust_saturation)
_hue = jax.jit(augment.adjust_hue)
_blur = jax.jit(augment.gaussian_blur, static_argnums=2)


def _views_fn(config: dict, num_views: int = 2):
    """One jitted augment_views per config (seed and step traced, as in the train step)."""
    key = (tuple(sorted(config.items())), num_views)
    if key not in _COMPILED:

        def run(images, index, seed, step):
            return augment.augment_views(
                images, index, seed=seed, step=step, config=config, num_views=num_views
            )

        _COMPILED[key] = jax.jit(run)
    return _COMPILED[key]


def _views(images, index, *, seed=0, step=0, config=None, num_views=2):
    fn = _views_fn(config or {}, num_views)
    out = fn(jnp.asarray(images), jnp.asarray(index, jnp.int32), jnp.int32(seed), jnp.int32(step))
    return [np.asarray(v) for v in out]


def _images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------
# config


def test_section_defaults_are_the_simclr_recipe_and_bad_values_are_refused():
    values = augment.settings(None)
    assert values == {
        "crop_scale": (0.08, 1.0),
        "crop_ratio": (3 / 4, 4 / 3),
        "flip": 0.5,
        "color_jitter": 0.8,
        "brightness": 0.4,
        "contrast": 0.4,
        "saturation": 0.4,
        "hue": 0.1,
        "grayscale": 0.2,
        "blur": 0.5,
        "blur_sigma": (0.1, 2.0),
        "solarize": 0.0,
        "illumination": 0.0,
        "ramp": 0.1,
        "falloff": 0.45,
    }
    assert augment.settings(augment.SECTION.to_config()) == values
    for bad in (
        {"flip": 1.5},
        {"solarize": -0.1},
        {"crop_scale": (0.5, 1.2)},
        {"crop_scale": (0.0, 1.0)},
        {"crop_scale": ()},
        {"crop_ratio": (4 / 3, 3 / 4)},
        {"blur_sigma": (0.0, 2.0)},
        {"hue": 0.6},
        {"brightness": -1.0},
        {"illumination": 2.0},
        {"ramp": -0.1},
        {"flips": 0.5},
    ):
        with pytest.raises(ConfigError, match=r"augment\."):
            augment.settings(bad)


# ---------------------------------------------------------------------------
# determinism


def test_views_are_bit_identical_across_calls_and_batch_orders():
    images, index = _images(16), np.arange(100, 116)
    first = _views(images, index, seed=3, step=7)
    again = _views(images, index, seed=3, step=7)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    perm = np.random.default_rng(1).permutation(16)
    permuted = _views(images[perm], index[perm], seed=3, step=7)
    for a, b in zip(first, permuted):
        np.testing.assert_array_equal(a[perm], b)


def test_views_do_not_depend_on_the_mesh():
    images, index = _images(16, seed=2), np.arange(16)
    devices = jax.devices()
    assert len(devices) == 8
    mesh = Mesh(np.array(devices), ("data",))
    sharded = NamedSharding(mesh, P("data"))
    fn = _views_fn({})
    on_mesh = fn(
        jax.device_put(images, sharded),
        jax.device_put(jnp.asarray(index, jnp.int32), sharded),
        jnp.int32(5),
        jnp.int32(11),
    )
    assert on_mesh[0].sharding.is_equivalent_to(sharded, 4)
    # The same compiled program as the other tests': the whole batch on one device.
    single = _views(images, index, seed=5, step=11)
    # The same draws for every example; the pixels agree to float32 rounding, not bit for bit: a
    # program for 2 examples per device and one for 16 may vectorise (and round) differently
    # (they did with XLA's elemental emitters, tests/xla_flags.py). A view drawn with another key
    # (a shard's position in place of the example's index) differs by tenths.
    for a, b in zip(on_mesh, single):
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-5)


def test_steps_seeds_views_and_examples_draw_differently():
    # One image under 16 indices: any two examples that looked alike would mean `index` is
    # not part of the key.
    images, index = np.repeat(_images(1, seed=4), 16, axis=0), np.arange(16)
    base = _views(images, index, seed=0, step=0)
    other_step = _views(images, index, seed=0, step=1)
    other_seed = _views(images, index, seed=1, step=0)
    for other in (other_step, other_seed):
        for v in range(2):
            for i in range(16):
                assert not np.array_equal(base[v][i], other[v][i])
    for i in range(16):
        assert not np.array_equal(base[0][i], base[1][i])
        for j in range(i):
            assert not np.array_equal(base[0][i], base[0][j])


def test_augment_one_is_what_the_batch_runs():
    # A config of cheap ops (the full one is compiled enough elsewhere); the random ones still
    # show that each view's key reaches its example.
    config = dict(
        OFF, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=0.5, grayscale=0.5, solarize=0.5
    )
    images, index = _images(4, seed=5), np.arange(10, 14)
    views = _views(images, index, seed=2, step=3, config=config)
    keys = augment.example_keys(jnp.asarray(index), seed=2, step=3, view=1)
    one = jax.jit(lambda x, k: augment.augment_one(x, k, config))
    for i in range(4):
        got = np.asarray(one(images[i] / np.float32(255), keys[i]))
        np.testing.assert_allclose(got, views[1][i], atol=1e-5)


# ---------------------------------------------------------------------------
# range and identity


@pytest.mark.parametrize("config", [{}, STRONG], ids=["simclr", "strong"])
def test_views_are_float32_images_in_the_unit_range(config):
    images = _images(16, seed=6)
    images[0] = 0
    images[1] = 255
    images[2, ..., 0] = 255  # saturated red: the hue and saturation edge cases
    # The recipe as the other tests compile it; the strong config, one view (half the compile).
    views = _views(images, np.arange(16), seed=1, step=2, config=config, num_views=2 if config == {} else 1)
    for v in views:
        assert v.dtype == np.float32 and v.shape == images.shape
        assert v.min() >= 0.0 and v.max() <= 1.0
        assert np.isfinite(v).all()


def test_with_every_op_off_the_views_are_the_images():
    images = _images(8, seed=7)
    for v in _views(images, np.arange(8), seed=9, step=4, config=OFF, num_views=1):
        # XLA may divide by 255 as a multiplication by 1/255: within one rounding.
        np.testing.assert_allclose(v, images.astype(np.float32) / 255, rtol=0, atol=1e-7)


def test_the_whole_area_at_any_allowed_aspect_is_the_identity_crop():
    # Only a box of aspect 1 holds the whole area of a square image, and no draw gives exactly 1:
    # every candidate misses, and the fallback (the largest centred box of an allowed aspect)
    # is the whole image.
    images = _images(8, seed=8)
    config = dict(OFF, crop_ratio=(3 / 4, 4 / 3))
    for v in _views(images, np.arange(8), config=config, num_views=1):
        np.testing.assert_allclose(v, images / 255, atol=1e-6)


# ---------------------------------------------------------------------------
# each op against numpy


def _bilinear(image, top, left, height, width, flip=False):
    """A numpy reference: output (i, j) samples the input at the box's point of pixel centre
    (i + 1/2, j + 1/2), with the four nearest pixels, coordinates clamped to the image."""
    h, w = image.shape[:2]
    out = np.zeros(image.shape, np.float64)
    for i in range(h):
        for j in range(w):
            y = min(max(top + (i + 0.5) * height / h - 0.5, 0.0), h - 1.0)
            x = min(max(left + (j + 0.5) * width / w - 0.5, 0.0), w - 1.0)
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = y - y0, x - x0
            out[i, j] = (
                (1 - fy) * (1 - fx) * image[y0, x0]
                + (1 - fy) * fx * image[y0, x1]
                + fy * (1 - fx) * image[y1, x0]
                + fy * fx * image[y1, x1]
            )
    return out[:, ::-1] if flip else out


@pytest.mark.parametrize(
    "box, flip",
    [((0.0, 0.0, 12.0, 16.0), False), ((3.3, 5.7, 7.25, 4.5), False), ((1.0, 2.0, 10.0, 9.0), True)],
)
def test_resized_crop_is_bilinear_resampling_of_the_box(box, flip):
    image = np.random.default_rng(9).random((12, 16, 3)).astype(np.float32)
    got = _crop(image, tuple(np.float32(v) for v in box), flip)
    np.testing.assert_allclose(
        np.asarray(got), _bilinear(image.astype(np.float64), *box, flip=flip), atol=1e-5
    )


def test_random_crop_boxes_have_the_drawn_area_and_aspect_and_lie_in_the_image():
    n = 2000
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    wide = (24, 40, (0.2, 0.6), (0.5, 2.0))  # some candidates miss: the box must still fit
    square = (32, 32, (0.2, 0.6), (3 / 4, 4 / 3))  # every first candidate fits
    too_wide = (24, 24, (1.0, 1.0), (2.0, 3.0))  # no candidate fits: the fallback
    # One program for the three settings, one compile.
    drawn = jax.jit(
        lambda k: [jax.vmap(lambda k: augment.random_crop_box(k, *s))(k) for s in (wide, square, too_wide)]
    )
    (top, left, h, w), square_boxes, fallback = (
        [np.asarray(b, np.float64) for b in box] for box in drawn(keys)
    )

    share = h * w / (24 * 40)
    assert share.min() >= 0.2 - 1e-5 and share.max() <= 0.6 + 1e-5
    assert (w / h).min() >= 0.5 - 1e-5 and (w / h).max() <= 2.0 + 1e-5
    assert top.min() >= 0 and left.min() >= 0
    assert (top + h).max() <= 24 + 1e-4 and (left + w).max() <= 40 + 1e-4
    # The share uniform, the aspect log-uniform, the place uniform: each mean within 4 sigma of
    # the middle of its range.
    top, left, h, w = square_boxes
    assert abs((h * w / 32**2).mean() - 0.4) < 4 * 0.4 / np.sqrt(12 * n)
    assert abs(np.log(w / h).mean()) < 4 * np.log(16 / 9) / np.sqrt(12 * n)
    assert abs(np.mean(left / (32 - w)) - 0.5) < 4 / np.sqrt(12 * n)
    # The centred box of the nearest allowed aspect, the largest that fits.
    np.testing.assert_allclose(np.stack(fallback, axis=-1), [[6.0, 0.0, 12.0, 24.0]] * n, atol=1e-5)


def test_flip_grayscale_and_solarize_at_probability_one():
    # One program for the three (each also has its own test, or its frequency measured).
    images = _images(4, seed=10)
    x = images.astype(np.float64) / 255
    (view,) = _views(
        images, np.arange(4), config=dict(OFF, flip=1.0, grayscale=1.0, solarize=1.0), num_views=1
    )
    flipped = x[:, :, ::-1]
    lum = 0.299 * flipped[..., 0] + 0.587 * flipped[..., 1] + 0.114 * flipped[..., 2]
    gray = np.repeat(lum[..., None], 3, axis=-1)
    np.testing.assert_allclose(view, np.where(gray >= 0.5, 1 - gray, gray), atol=1e-6)


def test_solarize_inverts_the_bright_half():
    x = np.linspace(0, 1, 11, dtype=np.float32)
    np.testing.assert_allclose(augment.solarize(x), np.where(x >= 0.5, 1 - x, x), atol=1e-7)


def test_brightness_contrast_and_saturation_match_their_formulas():
    x = np.random.default_rng(11).random((8, 10, 3)).astype(np.float32)
    xd = x.astype(np.float64)
    lum = 0.299 * xd[..., 0] + 0.587 * xd[..., 1] + 0.114 * xd[..., 2]
    for f in (0.0, 0.6, 1.0, 1.4):
        np.testing.assert_allclose(_brightness(x, f), np.clip(xd * f, 0, 1), atol=1e-6)
        np.testing.assert_allclose(_contrast(x, f), np.clip(f * xd + (1 - f) * lum.mean(), 0, 1), atol=1e-6)
        np.testing.assert_allclose(
            _saturation(x, f), np.clip(f * xd + (1 - f) * lum[..., None], 0, 1), atol=1e-6
        )


def test_hue_shift_matches_colorsys_and_keeps_grays():
    x = np.random.default_rng(12).random((6, 7, 3)).astype(np.float32)
    x[0, 0] = (1.0, 0.0, 0.0)
    x[0, 1] = (0.2, 0.2, 0.9)
    for shift in (0.0, 1.0, -1.0):
        np.testing.assert_allclose(_hue(x, shift), x, atol=1e-6)
    for shift in (0.05, -0.3, 0.5):
        want = np.empty(x.shape)
        for i, j in np.ndindex(x.shape[:2]):
            h, s, v = colorsys.rgb_to_hsv(*x[i, j].astype(np.float64))
            want[i, j] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
        np.testing.assert_allclose(_hue(x, shift), want, atol=1e-5)
    gray = np.repeat(x[..., :1], 3, axis=-1)
    np.testing.assert_array_equal(np.asarray(_hue(gray, 0.37)), gray)


def _numpy_blur(image, sigma, radius):
    taps = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (taps / sigma) ** 2)
    weights /= weights.sum()
    h, w = image.shape[:2]
    padded = np.pad(image, ((radius, radius), (0, 0), (0, 0)), mode="reflect")
    out = sum(weights[t] * padded[t : t + h] for t in range(2 * radius + 1))
    padded = np.pad(out, ((0, 0), (radius, radius), (0, 0)), mode="reflect")
    return sum(weights[t] * padded[:, t : t + w] for t in range(2 * radius + 1))


def test_gaussian_blur_matches_a_reflect_padded_convolution():
    x = np.random.default_rng(13).random((20, 14, 3))
    for sigma, radius in ((0.7, 1), (2.0, 5), (6.0, 6)):
        got = _blur(x.astype(np.float32), sigma, radius)
        np.testing.assert_allclose(got, _numpy_blur(x, sigma, radius), atol=1e-5)
    # A constant stays constant; the mean barely moves; a checkerboard loses most of its energy.
    flat = np.full((16, 16, 3), 0.3, np.float32)
    np.testing.assert_allclose(_blur(flat, 1.5, 3), flat, atol=1e-6)
    blurred = np.asarray(_blur(x.astype(np.float32), 1.5, 3))
    assert abs(blurred.mean() - x.mean()) < 0.01
    board = np.indices((16, 16)).sum(0) % 2
    board = np.repeat(board[..., None], 3, axis=-1).astype(np.float32)
    smooth = np.asarray(_blur(board, 1.0, 3))
    assert np.var(smooth) < 0.05 * np.var(board)


def test_blur_radius_is_a_tenth_of_the_side():
    assert augment.blur_radius(224, 224) == 11  # 23 taps, SimCLR's kernel at 224 px
    assert augment.blur_radius(32, 32) == 1
    assert augment.blur_radius(96, 160) == 4


def test_brightness_jitter_draws_one_factor_per_example_in_its_range():
    config = dict(OFF, color_jitter=1.0, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0)
    images = np.random.default_rng(14).integers(20, 150, (32, 8, 8, 3), dtype=np.uint8)
    (view,) = _views(images, np.arange(32), seed=1, config=config, num_views=1)
    x = images / 255
    factors = (view / x).reshape(32, -1)
    # No pixel is clipped (x <= 150/255, f <= 1.4), so each view is its image times one factor.
    np.testing.assert_allclose(factors, np.broadcast_to(factors[:, :1], factors.shape), rtol=1e-5)
    assert factors.min() >= 0.6 - 1e-5 and factors.max() <= 1.4 + 1e-5
    assert np.std(factors[:, 0]) > 0.1


def _illuminated(x, angle, ramp, falloff):
    """numpy: (x + ramp * d) * (1 - falloff * r^2), clipped; d and r from pixel centres."""
    h, w = x.shape[-3], x.shape[-2]
    yy, xx = np.meshgrid((np.arange(h) + 0.5) / h * 2 - 1, (np.arange(w) + 0.5) / w * 2 - 1, indexing="ij")
    d = np.cos(angle) * xx + np.sin(angle) * yy
    r2 = (xx**2 + yy**2) / (xx[0, 0] ** 2 + yy[0, 0] ** 2)
    return np.clip((x + ramp * d[..., None]) * (1 - falloff * r2)[..., None], 0, 1)


def test_illuminate_is_a_ramp_along_the_angle_times_a_radial_falloff():
    x = np.random.default_rng(16).random((6, 10, 3)).astype(np.float32)
    fn = jax.jit(augment.illuminate)
    for angle, ramp, falloff in ((0.0, 0.3, 0.0), (0.5 * np.pi, 0.2, 0.5), (2.0, 0.7, 0.9), (4.0, 0.0, 0.3)):
        np.testing.assert_allclose(
            fn(x, angle, ramp, falloff), _illuminated(x, angle, ramp, falloff), atol=1e-6
        )
    # Along +x the light rises to the right; the falloff darkens the corners by the whole factor.
    flat = np.full((8, 8, 3), 0.5, np.float32)
    lit = np.asarray(fn(flat, 0.0, 0.2, 0.0))
    assert lit[0, -1, 0] > lit[0, 0, 0] and np.allclose(lit[:, 0], lit[0, 0])
    np.testing.assert_allclose(np.asarray(fn(flat, 0.0, 0.0, 0.4))[0, 0], 0.3, atol=1e-6)


def test_illumination_draws_its_own_numbers_and_its_own_light_per_view():
    images = np.full((256, 8, 8, 3), 128, np.uint8)
    crop = dict(OFF, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=0.5, grayscale=0.3)
    # Switched on at zero strength it is the identity, and the crop, flip and grayscale keep
    # their draws: the illumination's numbers come from a key of their own.
    textured = _images(8, size=8, seed=17)
    base = _views(textured, np.arange(8), seed=3, config=crop, num_views=1)[0]
    noop = _views(textured, np.arange(8), seed=3, config=dict(crop, illumination=1.0, ramp=0.0, falloff=0.0))
    np.testing.assert_allclose(noop[0], base, atol=1e-6)
    # On a flat gray image each lit view is the formula at one (angle, ramp, falloff) in range;
    # the ramp alone makes a plane whose slope and direction can be read back.
    config = dict(OFF, illumination=0.75, ramp=0.2, falloff=0.0)
    first, second = _views(images, np.arange(256), seed=4, step=2, config=config)
    slopes = []
    for view in (first, second):
        gx = view[:, :, -1, 0].mean(axis=1) - view[:, :, 0, 0].mean(axis=1)
        gy = view[:, -1, :, 0].mean(axis=1) - view[:, 0, :, 0].mean(axis=1)
        slopes.append(np.hypot(gx, gy) / (2 * (1 - 1 / 8)))  # per unit of d, edge centres at +-7/8
    lit = slopes[0] > 1e-4
    assert abs(lit.mean() - 0.75) < 4 * np.sqrt(0.75 * 0.25 / 256)
    assert slopes[0].max() <= 0.2 + 1e-5 and np.percentile(slopes[0][lit], 90) > 0.15
    # The two views of an image are lit independently.
    assert np.mean(np.abs(first - second).max(axis=(1, 2, 3)) > 1e-4) > 0.5


# ---------------------------------------------------------------------------
# frequencies


def test_flip_and_grayscale_frequencies():
    n = 2048
    config = dict(OFF, flip=0.5, grayscale=0.2)
    images = _images(n, size=6, seed=15)
    (view,) = _views(images, np.arange(n), seed=2, step=1, config=config, num_views=1)
    x = images / 255
    grayed = (view[..., 0] == view[..., 1]).all(axis=(1, 2)) & (view[..., 1] == view[..., 2]).all(axis=(1, 2))
    lum = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    ref = np.where(grayed[:, None, None, None], np.repeat(lum[..., None], 3, -1), x)
    flipped = np.abs(view - ref[:, :, ::-1]).max(axis=(1, 2, 3)) < 1e-5
    kept = np.abs(view - ref).max(axis=(1, 2, 3)) < 1e-5
    assert (flipped ^ kept).all()
    for p, hits in ((0.5, flipped), (0.2, grayed)):
        assert abs(hits.mean() - p) < 4 * np.sqrt(p * (1 - p) / n), (p, hits.mean())
    # The two choices are drawn independently.
    both = (flipped & grayed).mean()
    assert abs(both - 0.1) < 4 * np.sqrt(0.09 / n)
