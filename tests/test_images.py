"""Image decoding (any mode, EXIF orientation, JPEG draft), random-resized crops, worker processes
and resumption, and the image statistics from config to the model's input."""

import io
import json

import grain
import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from clipjax.config import apply_overrides, config_from_dict, default_config
from clipjax.data.decode import BATCH_KEYS, Decoder, RecordReader
from clipjax.data.drops import DropCounter
from clipjax.data import pipeline, records, tokenizers, workers as worker_pool
from clipjax.data.images import (
    center_crop_box,
    decode_image,
    random_resized_crop_box,
    square_rgb,
)
from tests.helpers import data_config, load_config


def _encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _photo(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth colour fields plus grain: compresses and resamples like a photograph."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
        (width, height), Image.BICUBIC
    )
    noise = rng.normal(0, 6, (height, width, 3))
    return np.clip(np.asarray(coarse, np.float64) + noise, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# modes


def test_greyscale_8_and_16_bit_become_three_equal_channels():
    grey = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (16, 1))  # 32 wide, 16 high
    got = decode_image(_encode(Image.fromarray(grey)), 16)
    assert got.shape == (16, 16, 3)
    np.testing.assert_array_equal(got[..., 0], got[..., 1])
    np.testing.assert_array_equal(got[..., 0], got[..., 2])
    np.testing.assert_allclose(got[..., 0], square_rgb(Image.fromarray(grey), 16)[..., 0])

    # A 16-bit horizontal gradient over the full 0..65535 range, noise in the low bytes: the high
    # byte is what shows (PIL's own convert() would clip it to white).
    rng = np.random.default_rng(0)
    v16 = (np.arange(64, dtype=np.uint16) * 1024)[None, :] + rng.integers(0, 256, (32, 64), dtype=np.uint16)
    data = _encode(Image.fromarray(v16))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    got = decode_image(data, 16).astype(np.int32)
    np.testing.assert_array_equal(got[..., 0], got[..., 2])
    expected = square_rgb(Image.fromarray((v16 >> 8).astype(np.uint8)), 16).astype(np.int32)
    assert np.abs(got - expected).max() <= 1
    row = got[8, :, 0]
    assert np.all(np.diff(row) > 0) and 60 < row[0] < 70 and 180 < row[-1] < 192  # the middle half


def test_transparent_pixels_are_composited_over_white():
    # A known colour, opaque, in the middle of a fully transparent (black underneath) square.
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[8:24, 8:24] = (200, 30, 60, 255)
    got = decode_image(_encode(Image.fromarray(rgba)), 32)
    np.testing.assert_array_equal(got[12:20, 12:20], np.full((8, 8, 3), (200, 30, 60)))
    np.testing.assert_array_equal(got[:4, :4], 255)  # white, not the black under alpha 0
    # Downscaled, the edges blend the colour with white, never with black.
    small = decode_image(_encode(Image.fromarray(rgba)), 8).astype(int)
    assert small[..., 0].min() >= 190 and (small[0, 0] == 255).all()  # black would give ~100 red

    # LA: grey 100 at half opacity over white.
    la = np.stack([np.full((8, 8), 100, np.uint8), np.full((8, 8), 128, np.uint8)], axis=-1)
    got = decode_image(_encode(Image.fromarray(la, "LA")), 8).astype(int)
    assert np.all(np.abs(got - (100 * 128 + 255 * 127) / 255) <= 1)

    # P with a transparent palette entry (PNG tRNS and GIF).
    p = Image.frombytes("P", (4, 4), np.array([[0, 1, 2, 1]] * 4, np.uint8).tobytes())
    p.putpalette([10, 20, 30, 0, 0, 0, 250, 0, 0])
    for fmt in ("PNG", "GIF"):
        got = decode_image(_encode(p, fmt, transparency=1), 4)
        np.testing.assert_array_equal(got[0], [(10, 20, 30), (255, 255, 255), (250, 0, 0), (255, 255, 255)])


def test_cmyk_jpeg_of_a_known_colour():
    for cmyk, rgb in (
        ((0, 255, 255, 0), (255, 0, 0)),
        ((255, 0, 0, 0), (0, 255, 255)),
        ((0, 0, 0, 128), (127,) * 3),
    ):
        im = Image.new("CMYK", (24, 16), cmyk)
        data = _encode(im, "JPEG", quality=95)
        assert Image.open(io.BytesIO(data)).mode == "CMYK"
        got = decode_image(data, 8).astype(int)
        assert np.abs(got - np.array(rgb)).max() <= 4, (cmyk, got[0, 0])


def _bands() -> np.ndarray:
    """96 wide, 64 high: red, green and blue vertical bands, 32 px each."""
    image = np.zeros((64, 96, 3), np.uint8)
    for i in range(3):
        image[:, 32 * i : 32 * (i + 1), i] = 255
    return image


@pytest.mark.parametrize(
    "orientation,upright",
    [
        (1, lambda a: a),
        (2, lambda a: a[:, ::-1]),  # mirrored left-right
        (3, lambda a: a[::-1, ::-1]),  # upside down
        (6, lambda a: np.rot90(a, -1)),  # stored turned left: shown turned a quarter clockwise
        (8, lambda a: np.rot90(a, 1)),
    ],
)
def test_jpeg_exif_orientation_is_applied(orientation, upright):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(_bands()), "JPEG", quality=95, exif=exif.tobytes())
    got = decode_image(data, 32)  # drafted at 1/2 (48 x 32 stored) before it is turned
    # Where each band should be: the upright picture, centre-cropped.
    want = square_rgb(Image.fromarray(np.ascontiguousarray(upright(_bands()))), 32)
    for y, x in ((3, 16), (16, 16), (28, 16), (16, 3), (16, 28)):  # inside a band in every layout
        channel = int(np.argmax(want[y, x]))
        assert got[y, x, channel] > 200 and np.delete(got[y, x], channel).max() < 60, (orientation, y, x)
    # Portrait when turned: the bands run across, red on top for orientation 6.
    if orientation == 6:
        assert got[3, 16].argmax() == 0 and got[28, 16].argmax() == 2


# ---------------------------------------------------------------------------
# JPEG draft


def _no_draft(monkeypatch):
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda self, mode, size: None)


def test_draft_decodes_large_jpegs_at_a_reduced_scale_and_close_to_the_full_decode(monkeypatch):
    data = _encode(Image.fromarray(_photo(640, 480, 0)), "JPEG", quality=90)
    asked = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real_draft(self, mode, size)
        asked.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    drafted = decode_image(data, 224).astype(int)
    assert asked == [((224, 224), (320, 240))]  # decoded at half scale: the shorter side keeps 240
    # A region of a fifth of the width must keep 224 px across: no reduction.
    region = (100.0, 80.0, 228.0, 176.0)
    cropped = decode_image(data, 224, crop=lambda w, h: region).astype(int)
    assert asked[-1][1] == (640, 480)
    full_region = decode_image(data, 224, crop=lambda w, h: (0.0, 0.0, float(w), float(h))).astype(int)
    assert asked[-1][1] == (320, 240)

    _no_draft(monkeypatch)
    for got, crop in (
        (drafted, None),
        (cropped, lambda w, h: region),
        (full_region, lambda w, h: (0, 0, w, h)),
    ):
        full = decode_image(data, 224, crop=crop).astype(int)
        diff = np.abs(got - full)
        assert diff.mean() < 2.0 and np.percentile(diff, 99) < 12, (diff.mean(), np.percentile(diff, 99))


def test_centre_crop_box_matches_resize_then_crop():
    wide = _photo(50, 30, 1)
    box = center_crop_box(50, 30, 16)
    assert box[1] == 0 and box[3] == 30 and abs((box[0] + box[2]) / 2 - 25) < 1
    expected = np.asarray(Image.fromarray(wide).resize((27, 16), Image.BICUBIC))[:, 5:21].astype(int)
    assert np.abs(square_rgb(Image.fromarray(wide), 16).astype(int) - expected).max() <= 1


# ---------------------------------------------------------------------------
# random-resized crops


def test_random_resized_crop_box_stays_in_range():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = int(rng.integers(50, 600)), int(rng.integers(50, 600))
        left, top, right, bottom = random_resized_crop_box(w, h, rng, scale=(0.08, 1.0))
        assert 0 <= left < right <= w + 1e-9 and 0 <= top < bottom <= h + 1e-9
        share, aspect = (right - left) * (bottom - top) / (w * h), (right - left) / (bottom - top)
        fallback = left == (w - (right - left)) / 2 and top == (h - (bottom - top)) / 2
        assert fallback or (0.08 - 1e-9 <= share <= 1 + 1e-9 and 3 / 4 - 1e-9 <= aspect <= 4 / 3 + 1e-9)
    # A share of 90-100% cannot fit a 3/4..4/3 aspect in a panorama: the centred 4/3 region.
    box = random_resized_crop_box(1000, 10, np.random.default_rng(0), scale=(0.9, 1.0))
    np.testing.assert_allclose(box, (500 - 20 / 3, 0, 500 + 20 / 3, 10))


def _record(image: bytes, caption: str, index: int) -> bytes:
    """One record as clipjax's prepared datasets store it (text_id: the index)."""
    return records.pair_record(image, caption.encode(), index, text_id=index)


class MemoryRecords:
    """A random-access record source in memory (module level: worker processes unpickle it)."""

    def __init__(self, records):
        self.records = list(records)

    def __len__(self):
        return len(self.records)

    def __getitems__(self, ids):
        return [self.records[i] for i in ids]


@pytest.fixture(scope="module")
def photo_records():
    records = []
    for i in range(20):
        w, h = 64 + 8 * (i % 5), 48 + 8 * (i % 3)
        image = _photo(w, h, 100 + i)
        data = _encode(Image.fromarray(image), "PNG" if i % 2 else "JPEG", quality=90)
        records.append(_record(data, f"photo {i}", i))
    records[7] = _record(b"not an image", "broken", 7)
    return MemoryRecords(records)


def _tokenizer():
    return tokenizers.make_tokenizer(dict(kind="byte", max_len=12))


def test_random_crops_are_deterministic_per_seed_epoch_and_record(photo_records):
    decoder = Decoder(RecordReader(photo_records), 24, tokenizer=_tokenizer())
    crops = decoder.with_random_crop((0.08, 1.0), seed=(3, 0))
    ids = np.array([0, 1, 2, 7, 9])

    def images(d, ids, epoch):
        out = d({"index": ids, "epoch": np.full(len(ids), epoch)})
        return dict(zip(out["index"].tolist(), out["image"]))

    first = images(crops, ids, 0)
    assert sorted(first) == [0, 1, 2, 9]  # record 7 is still skipped, and counted
    assert crops({"index": ids, "epoch": np.zeros(5)})["_dropped"] == [(3, 7, "bad_image")]
    again = images(crops, ids[::-1], 0)  # the same crop whatever the chunk around the record
    for i in first:
        np.testing.assert_array_equal(first[i], again[i])
    for other in (images(crops, ids, 1), images(decoder.with_random_crop((0.08, 1.0), seed=(4, 0)), ids, 0)):
        assert all(not np.array_equal(first[i], other[i]) for i in first)  # next epoch, other seed
    # Without random crops (evaluation), the centre crop.
    centre = decoder(ids)
    for i, image in zip(centre["index"], centre["image"]):
        data = records.parse(photo_records.__getitems__([int(i)]), (), ("image",))["image"][0]
        np.testing.assert_array_equal(image, decode_image(data, 24))
    with pytest.raises(ValueError, match="epoch"):
        crops(ids)


def _iterator(source, workers: int, crop=(0.5, 1.0), seed: int = 1):
    cfg = data_config(batch_size=6, image_size=24, worker_count=workers, random_resized_crop=crop, prefetch=2)
    decoder = Decoder(RecordReader(source), 24, tokenizer=_tokenizer())
    return pipeline.make_train_iterator(decoder, cfg, seed=seed)


def _same(a, b):
    assert list(a) == list(BATCH_KEYS) == list(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_worker_processes_give_the_same_stream_and_resume_exactly_across_worker_counts(photo_records):
    """20 records (one bad), batches of 6 that straddle epochs: the stream and its states do not
    depend on the number of worker processes, so a run resumes on a host with other cores."""
    with_workers = _iterator(photo_records, 2)
    try:
        batches = [next(with_workers)]
        batches.append(next(with_workers))
        state = with_workers.get_state()
        assert json.loads(json.dumps(state)) == state
        batches += [next(with_workers) for _ in range(4)]
        assert with_workers.drop_counts["bad_image"] >= 1
    finally:
        with_workers.close()

    in_thread = _iterator(photo_records, 0)
    for want in batches:
        _same(next(in_thread), want)
    assert not np.array_equal(batches[0]["image"], next(_iterator(photo_records, 0, crop=()))["image"])

    resumed = _iterator(photo_records, 0)
    resumed.set_state(state)
    for want in batches[2:]:
        _same(next(resumed), want)

    in_thread = _iterator(photo_records, 0)
    for _ in range(3):
        next(in_thread)
    resumed = _iterator(photo_records, 2)
    try:
        resumed.set_state(in_thread.get_state())
        for want in batches[3:]:
            _same(next(resumed), want)
    finally:
        resumed.close()


def _non_empty(chunk):
    return len(chunk["index"]) > 0


def _in_key_order(batch):
    # Rebatching rebuilds dicts with sorted keys; keep the documented order.
    return {k: batch[k] for k in BATCH_KEYS}


def _legacy_iterator(source, workers: int):
    """The grain graph of the previous version (rebatching in grain), for its checkpointed states."""
    cfg = data_config(batch_size=6, image_size=24)
    decoder = Decoder(RecordReader(source), 24, tokenizer=_tokenizer())
    chunks = pipeline.IndexChunks(len(source), 6, seed=(1, int(cfg.shuffle_seed)))
    ds = grain.MapDataset.source(chunks).map(decoder).to_iter_dataset()
    if workers:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    ds = ds.map(DropCounter()).filter(_non_empty)
    ds = grain.experimental.RebatchIterDataset(ds, batch_size=6, drop_remainder=True)
    return iter(ds.map(_in_key_order))


@pytest.mark.parametrize("workers", [0, 2])
def test_states_saved_by_the_previous_version_resume(photo_records, workers):
    legacy = _legacy_iterator(photo_records, workers)
    try:
        for _ in range(3):
            next(legacy)
        state = legacy.get_state()
        expected = [next(legacy) for _ in range(3)]
    finally:
        getattr(legacy, "close", lambda: None)()
    resumed = _iterator(photo_records, 0, crop=())
    resumed.set_state(state)
    for want in expected:
        _same(next(resumed), want)


def test_worker_count_default_follows_the_cores_and_the_work():
    cores = worker_pool.available_cores()
    raw = Decoder(RecordReader(MemoryRecords([])), 8, encoded_images=False)
    encoded = Decoder(RecordReader(MemoryRecords([])), 8)
    assert default_config().data.worker_count == -1
    assert worker_pool.worker_processes(-1, encoded) == cores
    assert worker_pool.worker_processes(-1, raw) == 0  # stored pixels: nothing to spread
    assert worker_pool.worker_processes(-1, raw.with_random_crop((0.5, 1), (0, 0))) == cores
    assert worker_pool.worker_processes(0, encoded) == 0 and worker_pool.worker_processes(3, raw) == 3


# ---------------------------------------------------------------------------
# normalisation: config -> model input -> stored run


def _captured_tower_input(config, monkeypatch, images):
    from clipjax.models import model_factory

    model = model_factory(config, vocab_size=32)()
    seen = []

    def tower(self, x):
        seen.append(np.asarray(x))
        return np.zeros((x.shape[0], self.out_dim), np.float32)

    monkeypatch.setattr(type(model.image_tower), "__call__", tower)
    model.image_features(images)
    return seen[0]


def test_image_statistics_flow_from_the_config_to_the_model_input(monkeypatch):
    config = default_config()
    config.data.image_size = 8
    config.model.text.variant = "tiny"  # only the image input is looked at
    constant = np.full((2, 8, 8, 3), (51, 102, 204), np.uint8)
    x = _captured_tower_input(config, monkeypatch, constant)
    clip_mean, clip_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    np.testing.assert_allclose(x, (constant / 255 - np.array(clip_mean)) / np.array(clip_std), rtol=1e-5)

    apply_overrides(config, {"model.image_mean": (0.5, 0.5, 0.5), "model.image_std": (0.25, 0.5, 1.0)})
    x = _captured_tower_input(config, monkeypatch, constant)
    np.testing.assert_allclose(x, (constant / 255 - 0.5) / np.array([0.25, 0.5, 1.0]), rtol=1e-5)
    # Floats in [0, 1] are the same picture.
    y = _captured_tower_input(config, monkeypatch, constant.astype(np.float32) / 255)
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)

    # The stored run keeps them: a config.json read back builds the same model input.
    stored = json.loads(json.dumps(config.to_dict()))
    x_loaded = _captured_tower_input(config_from_dict(stored), monkeypatch, constant)
    np.testing.assert_array_equal(x_loaded, x)


def test_siglip_config_and_checkpoint_meta_carry_the_statistics():
    from clipjax.run_store.record import checkpoint_meta
    from clipjax.run_store.resume import ResumeError, check_resume

    siglip = load_config("siglip_vit_b16.py", "")
    assert tuple(siglip.model.image_mean) == (0.5,) * 3 and tuple(siglip.model.image_std) == (0.5,) * 3
    clip = load_config("clip_vit_b16.py", "")
    assert tuple(clip.model.image_mean) == (0.48145466, 0.4578275, 0.40821073)
    assert tuple(clip.data.random_resized_crop) == (0.9, 1.0) and clip.data.worker_count == -1

    meta = checkpoint_meta(siglip, _tokenizer(), examples_seen=0, data_offset=0)
    assert meta["preprocessing"]["mean"] == [0.5] * 3 and meta["preprocessing"]["std"] == [0.5] * 3
    assert meta["config"]["model"]["image_mean"] == [0.5] * 3

    # A run stored before these keys existed used CLIP's statistics and centre crops: resuming it
    # with the defaults is no change; with other statistics it is refused (its weights expect them).
    old = default_config().to_dict()
    del old["model"]["image_mean"], old["model"]["image_std"], old["data"]["random_resized_crop"]
    assert check_resume(old, default_config(), "w") == {}
    assert config_from_dict(old).model.image_mean == default_config().model.image_mean
    changed = apply_overrides(default_config(), {"model.image_mean": (0.5, 0.5, 0.5)})
    with pytest.raises(ResumeError, match="model.image_mean"):
        check_resume(old, changed, "w")


def test_bad_statistics_and_crop_settings_are_one_line_errors():
    from clipjax.config import ConfigError, validate

    for key, value, message in (
        ("model.image_std", (0.5, 0.0, 0.5), "model.image_std: expected positive values"),
        ("model.image_mean", (0.5, 0.5), "model.image_mean: expected three finite numbers"),
        ("data.random_resized_crop", (0.5, 1.5), "data.random_resized_crop: expected 0 < low <= high <= 1"),
        ("data.worker_count", -2, "data.worker_count: -2 is below the minimum -1"),
    ):
        with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")):
            validate(apply_overrides(default_config(), {key: value}), num_devices=1)
