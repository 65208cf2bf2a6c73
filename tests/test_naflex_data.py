"""NaFlex training inputs from the one decoder (clipjax.data.naflex): the grids and pixels of
transformers' processor for whole images, the same random region for the same (seed, epoch,
example), bad examples dropped and counted, and one sequence length per batch drawn from (seed,
batch number)."""

import io

import numpy as np
import pytest
from PIL import Image

from clipjax.data.decode import Decoder, Raw, load_arrays
from clipjax.data.drops import DropCounter
from clipjax.data.naflex import NaflexInputs, OneLengthBatches, seq_len_at
from clipjax.pretrained.preprocessing import naflex_patches

# (height, width) -> (rows, cols) at patch 4 and a budget of 20: transformers' Siglip2ImageProcessor's
# grids for these sizes (tests/test_pretrained_siglip2_naflex.py checks them against the processor).
GRIDS_AT_20 = {(40, 90): (3, 6), (64, 64): (4, 4), (100, 30): (7, 2), (10, 13): (4, 5)}
NAFLEX = NaflexInputs(patch_size=4, seq_lens=(20, 48))


def _png(height: int, width: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class _Reader:
    """`Raw` examples of (image bytes, caption bytes) pairs, by position."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __call__(self, ids, epochs=None):
        return [Raw(int(i), *self.pairs[int(i)]) for i in np.asarray(ids).reshape(-1)]


def _decoder(pairs, naflex=NAFLEX):
    return Decoder(_Reader(pairs), 16).with_naflex(naflex)


def test_whole_images_get_the_processors_grids_and_pixels_at_every_length():
    images = [_png(h, w, seed) for seed, (h, w) in enumerate(GRIDS_AT_20)]
    out = _decoder([(image, b"a caption") for image in images])(list(range(len(images))))
    assert out["image"].shape == (4, 20 + 48, 4 * 4 * 3) and out["image_grid"].shape == (4, 2, 2)
    np.testing.assert_array_equal(out["image_grid"][:, 0], list(GRIDS_AT_20.values()))
    for j, data in enumerate(images):
        pixels = np.asarray(Image.open(io.BytesIO(data)))
        for k, (start, length) in enumerate(((0, 20), (20, 48))):
            # clipjax.load's fitting (the processor's, pixel for pixel) of the whole image.
            patches, grid = naflex_patches(pixels, 4, length)
            assert tuple(out["image_grid"][j, k]) == grid
            np.testing.assert_array_equal(out["image"][j, start : start + length], patches)


def test_a_random_region_depends_on_seed_epoch_and_example_only():
    pairs = [(_png(60 + 10 * i, 90 - 10 * i, i), b"a caption") for i in range(4)]
    decoder = _decoder(pairs).with_random_crop((0.2, 0.6), seed=(0, 0))

    def decoded(ids, epoch):
        out = decoder({"index": np.array(ids), "epoch": np.full(len(ids), epoch)})
        return {i: (out["image"][j], out["image_grid"][j]) for j, i in enumerate(ids)}

    first, again = decoded([0, 1, 2, 3], 0), decoded([3, 1], 0)
    for i in (1, 3):  # another chunk, another order: the same region
        np.testing.assert_array_equal(again[i][0], first[i][0])
        np.testing.assert_array_equal(again[i][1], first[i][1])
    whole = _decoder(pairs)(list(range(4)))["image_grid"]
    later = decoded([0, 1, 2, 3], 1)
    assert any(not np.array_equal(first[i][0], later[i][0]) for i in range(4))
    assert any(not np.array_equal(first[i][1], whole[i]) for i in range(4))  # a region, not the image


def test_bad_examples_are_dropped_and_counted():
    good = _png(30, 50, 0)
    pairs = [(good, b"good"), (good[: len(good) // 2], b"cut"), (b"", b"no image"), (good, b"  ")]
    drops = DropCounter()
    arrays = load_arrays(_decoder(pairs), [list(range(4))], drops=drops)
    assert dict(drops.counts) == {"bad_image": 1, "missing_image": 1, "bad_caption": 1}
    assert arrays["image"].shape == (1, 68, 48) and arrays["image_grid"].shape == (1, 2, 2)
    raw = Decoder(_Reader([(bytes(16 * 16 * 3), b"ok"), (bytes(10), b"short")]), 16, encoded_images=False)
    out = raw.with_naflex(NAFLEX)([0, 1])
    assert [d[2] for d in out["_dropped"]] == ["bad_image_shape"]
    np.testing.assert_array_equal(out["image_grid"][0], [(4, 4), (6, 6)])  # a square stays square
    empty = _decoder(pairs)([])
    assert empty["image"].shape == (0, 68, 48) and empty["image_grid"].shape == (0, 2, 2)


def _batches(count, b=3):
    """Decoded batches as the batchers give them: every length's sequences side by side."""
    rng = np.random.default_rng(0)
    for _ in range(count):
        yield {
            "image": rng.integers(0, 256, (b, 68, 48), dtype=np.uint8),
            "image_grid": rng.integers(1, 5, (b, 2, 2), dtype=np.int32),
            "text": rng.integers(0, 9, (b, 4), dtype=np.int32),
        }


@pytest.mark.parametrize("first", [0, 5])
def test_each_batch_has_the_length_of_its_number(first):
    naflex = NAFLEX._replace(seed=3, first_batch=first)
    kept = list(OneLengthBatches(_batches(12), naflex))
    lengths = [b["image"].shape[1] for b in kept]
    assert lengths == [seq_len_at(naflex, n) for n in range(first, first + 12)]
    assert set(lengths) == {20, 48}
    # A run resumed at batch `first` sees what the run from 0 saw there.
    assert (
        lengths
        == [
            b["image"].shape[1]
            for b in OneLengthBatches(_batches(12 + first), naflex._replace(first_batch=0))
        ][first:]
    )
    for batch, full in zip(kept, _batches(12)):
        k = NAFLEX.seq_lens.index(batch["image"].shape[1])
        start = (0, 20)[k]
        np.testing.assert_array_equal(
            batch["image"], full["image"][:, start : start + batch["image"].shape[1]]
        )
        np.testing.assert_array_equal(batch["image_grid"], full["image_grid"][:, k])
        np.testing.assert_array_equal(batch["text"], full["text"])


def test_webdataset_batches_are_patch_sequences_of_one_length(tmp_path):
    """The streaming pipeline (tar shards, damaged samples among them) gives NaFlex batches too:
    40 x 32 px images as 4 x 5 patches at 20, 6 x 8 at 48."""
    from clipjax.data.sources import make_source
    from tests.test_webdataset import _tiny_config, write_shards

    write_shards(tmp_path / "shards", per_shard=20, size=(40, 32))
    source = make_source(_tiny_config(tmp_path / "shards", tmp_path / "data").data)
    naflex = NAFLEX._replace(first_batch=1)  # batches 1, 2, 3: 48, 20 and 48 patches
    batches = source.train_iterator(source.tokenizer(), seed=0, naflex=naflex)
    for n in range(1, 4):
        batch = next(batches)
        length = seq_len_at(naflex, n)
        assert batch["image"].shape == (16, length, 48) and batch["image_grid"].shape == (16, 2)
        assert (batch["image_grid"] == {20: (4, 5), 48: (6, 8)}[length]).all()
    batches.close()
