"""Tests of the shapes options `nuisance` (per-image nuisance factors) and `concepts` (K of the 320).

Both default to off, and then the data must be exactly what it was before they existed: the
hashes below pin that.
"""

import hashlib
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds

from clipjax.data.sources.shapes import builder as shapes_tfds, procedural as shapes
from clipjax.data.sources import make_source
from clipjax.schema import ConfigError
from tests.helpers import data_config

# sha256 of generate_split's images, captions ("\n"-joined) and int fields (label, shape, color,
# size, position, text_id, index stacked as little-endian int32), computed with
# clipjax/data/sources/shapes/procedural.py as it was before the nuisance and concepts options were added.
_BEFORE = {
    (2048, 0, 32): (
        "b97f86905706d25903c6dad9fced94a9bb7b9353b6060a283941a57e629022d1",
        "6fb9e4f9a84bfd2594efadefde28ee916c39e9a8d66f0ce6509bb86c810c477d",
        "79a3bf2c4d69236ce980b9768d0407318a8c2b8a104c55b79ddb256670169a82",
    ),
    (1500, 7, 48): (
        "8d93f2411623a14b66666fd8d3be18baddb93877d183bf443247f02d79761150",
        "52bc249df83ad1043f1ff3b22be62fceeca96060ebd448c5d7e4dc3c89c8af3e",
        "dfd0f0995442c961b70d01f5663bc1e50302384f5e80e4b51eb2ca8e2c9c6527",
    ),
}
_INTS = ("label", "shape", "color", "size", "position", "text_id", "index")
_FEATURES = {"image", "caption", "text_id", "index", "label", "shape", "color", "size", "position"}


def _digest(data):
    ints = np.stack([data[k] for k in _INTS]).astype("<i4")
    return tuple(
        hashlib.sha256(b).hexdigest()
        for b in (data["image"].tobytes(), "\n".join(data["caption"]).encode(), ints.tobytes())
    )


@pytest.mark.parametrize("num,seed,size", sorted(_BEFORE))
def test_defaults_are_unchanged(num, seed, size):
    data = shapes.generate_split(num, seed, size)
    assert set(data) == _FEATURES
    assert _digest(data) == _BEFORE[num, seed, size]
    # All 320 concepts, named explicitly, are the default draw.
    assert (
        _digest(shapes.generate_split(num, seed, size, concepts=shapes.NUM_CONCEPTS))
        == _BEFORE[num, seed, size]
    )


def test_config_names_features_and_pickling(tmp_path):
    assert shapes_tfds.config_name(32, 50_000, 5_000, 0) == "s32_train50000_test5000_seed0"
    assert shapes_tfds.make_config().name == "s32_train50000_test5000_seed0"
    assert shapes_tfds.make_config(concepts=320) is shapes_tfds.make_config()
    default = shapes_tfds.Shapes(data_dir=str(tmp_path), config=shapes_tfds.make_config(8, 12, 4, 1))
    assert set(default.info.features) == _FEATURES

    config = shapes_tfds.make_config(8, 12, 4, 1, nuisance=True, concepts=32)
    assert config.name == "s8_train12_test4_seed1_nuis_k32"
    assert shapes_tfds.make_config(8, 12, 4, 1, nuisance=True).name == "s8_train12_test4_seed1_nuis"
    assert shapes_tfds.make_config(8, 12, 4, 1, concepts=5).name == "s8_train12_test4_seed1_k5"
    # Grain workers unpickle configs to the one cached instance per name.
    assert pickle.loads(pickle.dumps(config)) is config
    for name in ("s8_train12_test4_seed1_nuis_k32", "s8_train12_test4_seed1_k5", "s8_train12_test4_seed1"):
        assert shapes_tfds.Shapes.get_builder_config(name).name == name
    for name in ("s8_train12_test4_seed1_k320", "s8_train12_test4_seed1_k0", "s8_train12_test4_seed1_k321"):
        assert shapes_tfds.Shapes.get_builder_config(name) is None
    builder = shapes_tfds.Shapes(data_dir=str(tmp_path), config=config)
    assert set(builder.info.features) == _FEATURES | set(shapes.NUISANCE_NAMES)
    with pytest.raises(ValueError, match="concepts"):
        shapes_tfds.make_config(concepts=321)


# ---------------------------------------------------------------------------
# Nuisance factors


def _nearest_class_mean_accuracy(x, y, num_classes, num_train):
    """Fits class means of z-scored features on the first num_train rows, scores the rest."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    mean, std = x[:num_train].mean(0), x[:num_train].std(0) + 1e-9
    z = (x - mean) / std
    centres = np.stack([z[:num_train][y[:num_train] == c].mean(0) for c in range(num_classes)])
    predicted = np.argmin(((z[num_train:, None] - centres[None]) ** 2).sum(-1), axis=1)
    return float(np.mean(predicted == y[num_train:]))


def _pixel_statistics(images):
    """{factor: [N, f] simple statistics of the pixels}, the read-outs the factors are built for.

    Medians (over pixels, or over the four corners) keep the object, which covers at most about a
    quarter of the image and one corner, from dominating."""
    img = images.astype(np.float32)
    gray = img.mean(-1)
    n, s = gray.shape[:2]
    q, mid = s // 4, slice(3 * s // 8, 5 * s // 8)

    def median(region):
        return np.median(region.reshape(n, -1), axis=1)

    corners = np.stack([gray[:, :q, :q], gray[:, :q, -q:], gray[:, -q:, :q], gray[:, -q:, -q:]], 1).mean(
        (2, 3)
    )  # the 8x8 corner blocks
    corner = np.median(corners, 1)
    edges = np.stack(
        [gray[:, :q, mid].mean((1, 2)), gray[:, -q:, mid].mean((1, 2))]
        + [gray[:, mid, :q].mean((1, 2)), gray[:, mid, -q:].mean((1, 2))],
        1,
    )
    edge = np.median(edges, 1)
    centre = gray[:, mid, mid].mean((1, 2))
    strip = s * 3 // 16
    left, right = median(gray[:, :, :strip]), median(gray[:, :, -strip:])
    top, bottom = median(gray[:, :strip]), median(gray[:, -strip:])
    # Texture: the spectrum at the stripe frequency (along x) and the checker's (along x and y).
    spectrum = np.abs(np.fft.fft2(gray - gray.mean((1, 2), keepdims=True)))
    stripes = spectrum[:, 0, s // 4]
    checker = spectrum[:, s // 8, s // 8] + spectrum[:, s // 8, -s // 8]
    # Noise: red minus green cancels the gray background (light, gradient, texture, vignette) and
    # is constant on the object, so what varies from pixel to pixel is the noise.
    noise = median(np.abs(np.diff(img[..., 0] - img[..., 1], axis=2)))
    c = s // 8
    outer = np.median(
        np.stack([gray[:, :c, :c], gray[:, :c, -c:], gray[:, -c:, :c], gray[:, -c:, -c:]], 1).mean((2, 3)), 1
    )
    return {
        "light": np.stack([edge, corner, centre, median(gray)], 1),
        "gradient": np.stack([np.abs(left - right), np.abs(top - bottom)], 1),
        "texture": np.log1p(np.stack([stripes, checker], 1)),
        "noise": np.log(noise + 1e-3),
        "vignette": np.log1p(outer) - np.log1p(edge),
    }


def test_nuisance_labels_are_balanced_independent_and_decodable():
    data = shapes.generate_split(4096, 0, nuisance=True)
    n = len(data["label"])
    assert set(data) == _FEATURES | set(shapes.NUISANCE_NAMES)
    for name, classes in shapes.NUISANCE_FACTORS.items():
        labels = data[name]
        assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < len(classes)
        counts = np.bincount(labels, minlength=len(classes))
        assert np.all(np.abs(counts - n / len(classes)) < 0.1 * n / len(classes)), (name, counts)

    # Independent of each other and of the concept: chi-square of each pair's contingency table.
    factors = {k: (data[k], len(c)) for k, c in shapes.NUISANCE_FACTORS.items()}
    others = {k: (data[k], len(shapes.ATTRIBUTES[k])) for k in shapes.ATTRIBUTE_NAMES}
    names = list(factors)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]] + [
        (a, b) for a in names for b in others
    ]
    everything = {**factors, **others}
    for a, b in pairs:
        (xa, ka), (xb, kb) = everything[a], everything[b]
        table = np.zeros((ka, kb))
        np.add.at(table, (xa, xb), 1)
        expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / n
        chi2 = ((table - expected) ** 2 / expected).sum()
        dof = (ka - 1) * (kb - 1)
        assert chi2 < dof + 6 * np.sqrt(2 * dof), (a, b, chi2, dof)

    # Each factor can be read off the pixels (chance: 1/4, 1/3, 1/3, 1/3, 1/2).
    stats = _pixel_statistics(data["image"])
    floors = {"light": 0.85, "gradient": 0.9, "texture": 0.85, "noise": 0.95, "vignette": 0.85}
    accuracy = {
        name: _nearest_class_mean_accuracy(stats[name], data[name], len(classes), 3072)
        for name, classes in shapes.NUISANCE_FACTORS.items()
    }
    assert all(accuracy[k] > floors[k] for k in floors), accuracy


def test_objects_stay_visible_in_their_colour_under_nuisance():
    # Every concept three times, under every kind of nuisance draw.
    concepts = np.tile(np.arange(shapes.NUM_CONCEPTS), 3)
    shp, col, siz, pos = shapes.concept_attributes(concepts)
    factors = shapes.draw_nuisance(np.random.default_rng(1), len(concepts))
    images = shapes.render(shp, col, siz, pos, np.random.default_rng(0), nuisance=factors).astype(np.float32)
    target = shapes._RGB[col][:, None, None, :]
    on_object = np.linalg.norm(images - target, axis=-1) < 60
    area = on_object.sum(axis=(1, 2))
    assert area.min() > 20
    for s in range(len(shapes.SHAPES)):
        assert area[(shp == s) & (siz == 1)].mean() > 1.8 * area[(shp == s) & (siz == 0)].mean()
    ys, xs = np.mgrid[:32, :32]
    cy = (on_object * ys).sum(axis=(1, 2)) / area
    cx = (on_object * xs).sum(axis=(1, 2)) / area
    np.testing.assert_array_equal(cy > 16, pos // 2 == 1)
    np.testing.assert_array_equal(cx > 16, pos % 2 == 1)
    # The object is the same object as without nuisance: same pixels, only the background and
    # the noise level differ (the quietest class keeps it within a few gray levels).
    plain = shapes.render(shp, col, siz, pos, np.random.default_rng(0)).astype(np.float32)
    inside = np.linalg.norm(plain - target, axis=-1) < 40
    quiet = factors["noise"] == 0
    diff = np.abs(images - plain)[quiet][inside[quiet]]
    assert np.median(diff) < 8


def test_nuisance_is_prefix_stable_and_leaves_the_other_streams_alone():
    long = shapes.generate_split(1100, 3, nuisance=True)
    short = shapes.generate_split(300, 3, nuisance=True)
    plain = shapes.generate_split(1100, 3)
    for k in short:
        np.testing.assert_array_equal(long[k][:300], short[k])
    for k in plain:
        if k != "image":
            np.testing.assert_array_equal(long[k], plain[k])  # captions and labels unchanged
    assert not np.array_equal(long["image"], plain["image"])
    # The pixel stream is untouched: at the medium noise level (the default's std) every object
    # pixel is the very pixel of the image without nuisance.
    target = shapes._RGB[plain["color"]][:, None, None, :]
    on_object = np.linalg.norm(plain["image"].astype(np.float32) - target, axis=-1) < 40
    medium = long["noise"] == 1
    assert on_object[medium].sum() > 50 * medium.sum()
    np.testing.assert_array_equal(
        long["image"][medium][on_object[medium]], plain["image"][medium][on_object[medium]]
    )
    labels_only = shapes.generate_split(1100, 3, nuisance=True, with_images=False)
    for k in shapes.NUISANCE_NAMES:
        np.testing.assert_array_equal(labels_only[k], long[k])
    assert shapes.generate_captions(1100, 3) == list(long["caption"])
    assert not np.array_equal(long["light"], shapes.generate_split(1100, 4, nuisance=True)["light"])


# ---------------------------------------------------------------------------
# A subset of the concepts


def test_concept_subsets():
    order = shapes.concept_order()
    assert sorted(order.tolist()) == list(range(shapes.NUM_CONCEPTS))
    shp, col, siz, pos = shapes.concept_attributes(order)
    for start in range(0, shapes.NUM_CONCEPTS, 40):
        run = slice(start, start + 40)
        assert len(set(zip(shp[run].tolist(), col[run].tolist()))) == 40  # every shape-color pair
        size_position = siz[run] * 4 + pos[run]
        assert all(len(set(size_position[shp[run] == s].tolist())) == 8 for s in range(5))
        assert all(len(set(size_position[col[run] == c].tolist())) == 5 for c in range(8))
    for k in range(1, shapes.NUM_CONCEPTS + 1):
        for name, values in zip(shapes.ATTRIBUTE_NAMES, (shp[:k], col[:k], siz[:k], pos[:k])):
            counts = np.bincount(values, minlength=len(shapes.ATTRIBUTES[name]))
            assert counts.max() - counts.min() <= (1 if name in ("shape", "color") else 3), (k, name)
    np.testing.assert_array_equal(shapes.concept_subset(0), np.arange(shapes.NUM_CONCEPTS))
    np.testing.assert_array_equal(shapes.concept_subset(320), np.arange(shapes.NUM_CONCEPTS))
    for k in (1, 7, 32, 40, 64, 100, 319):
        subset = shapes.concept_subset(k)
        np.testing.assert_array_equal(subset, np.sort(order[:k]))
        assert set(subset) <= set(shapes.concept_subset(k + 1))
        np.testing.assert_array_equal(shapes.concept_index(subset, k), np.arange(k))
    with pytest.raises(ValueError):
        shapes.concept_index(np.array([int(np.setdiff1d(np.arange(320), shapes.concept_subset(32))[0])]), 32)
    for bad in (-1, 321, 2.5):
        with pytest.raises(ValueError):
            shapes.concept_subset(bad)


@pytest.mark.parametrize("k", [1, 32, 100])
def test_generate_split_draws_k_concepts_uniformly(k):
    data = shapes.generate_split(20_000, 5, with_images=False, concepts=k)
    assert set(data["label"].tolist()) == set(shapes.concept_subset(k).tolist())
    counts = np.bincount(shapes.concept_index(data["label"], k), minlength=k)
    expected = len(data["label"]) / k
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected) + 1), counts
    np.testing.assert_array_equal(
        data["label"], shapes.concept_id(data["shape"], data["color"], data["size"], data["position"])
    )
    # Captions describe the drawn concept.
    for caption, *attributes in list(zip(data["caption"], *(data[a] for a in shapes.ATTRIBUTE_NAMES)))[:500]:
        parsed = shapes.parse_caption(caption)
        for name, value in zip(shapes.ATTRIBUTE_NAMES, attributes):
            assert parsed[name] in (-1, value), (caption, name)
    assert shapes.generate_captions(300, 5, concepts=k) == list(data["caption"][:300])


def test_all_concepts_have_the_default_support():
    default = shapes.generate_split(8000, 2, with_images=False)["label"]
    all_k = shapes.generate_split(8000, 2, with_images=False, concepts=320)["label"]
    np.testing.assert_array_equal(default, all_k)
    assert set(default.tolist()) == set(range(shapes.NUM_CONCEPTS))


# ---------------------------------------------------------------------------
# The tfds builder and the source


def test_tfds_builder_records_carry_the_nuisance_labels(tmp_path):
    builder = shapes_tfds.prepare_shapes(str(tmp_path), 8, 40, 12, 2, nuisance=True, concepts=16)
    name = builder.builder_config.name
    assert name == "s8_train40_test12_seed2_nuis_k16"
    sources = tfds.data_source(f"shapes/{name}", data_dir=str(tmp_path), download=False)
    for split, num, seed in (("train", 40, 2), ("test", 12, shapes_tfds.test_seed(2))):
        expected = shapes.generate_split(num, seed, 8, nuisance=True, concepts=16)
        got = [sources[split][i] for i in range(num)]
        assert set(got[0]) == set(expected)
        for k in expected:
            values = [g[k] for g in got]
            if k == "caption":
                assert [v.decode() for v in values] == list(expected[k])
            else:
                np.testing.assert_array_equal(np.stack(values), expected[k])


def _source(data_dir, **overrides):
    cfg = {
        "name": "shapes",
        "data_dir": str(data_dir),
        "batch_size": 8,
        "image_size": 8,
        "num_train": 24,
        "num_test": 10,
        "shapes_seed": 3,
        "tokenizer.kind": "byte",
        "tokenizer.max_len": 16,
        **overrides,
    }
    return make_source(data_config(**cfg))


def test_source_eval_arrays_carry_the_nuisance_labels_only_when_on(tmp_path):
    off = _source(tmp_path)
    arrays = off.eval_arrays(off.tokenizer())
    assert not set(shapes.NUISANCE_NAMES) & set(arrays)
    assert set(shapes.ATTRIBUTE_NAMES) <= set(arrays)
    assert off.builder.builder_config.name == "s8_train24_test10_seed3"

    on = _source(tmp_path, shapes_nuisance=True, shapes_concepts=12)
    assert on.builder.builder_config.name == "s8_train24_test10_seed3_nuis_k12"
    for split, seed in (("train", 3), ("test", shapes_tfds.test_seed(3))):
        arrays = on.eval_arrays(on.tokenizer(), split=split)
        expected = shapes.generate_split(len(arrays["label"]), seed, 8, nuisance=True, concepts=12)
        for k in shapes.NUISANCE_NAMES + shapes.ATTRIBUTE_NAMES + ("label",):
            np.testing.assert_array_equal(arrays[k], expected[k])
        np.testing.assert_array_equal(arrays["image"], expected["image"])


@pytest.mark.parametrize("value", [-1, 321])
def test_source_rejects_out_of_range_concepts(tmp_path, value):
    with pytest.raises(ConfigError, match="data.shapes_concepts"):
        _source(tmp_path, shapes_concepts=value)
