"""Own-data robustness: odd bytes in a CSV, changed image files, unusual image modes."""

import io
import logging
import os
import struct
import zlib

import numpy as np
from PIL import Image

from clipjax.data.drops import DropCounter
from clipjax.data.images import decode_image, square_rgb
from clipjax.data.sources import make_source
from tests.helpers import data_config


def _source(tmp_path, source):
    return make_source(
        data_config(
            name="image_text_folder",
            data_dir=str(tmp_path / "tfds"),
            source=str(source),
            test_fraction=0.0,
            max_bad_fraction=0.5,
            batch_size=4,
            image_size=12,
            **{"tokenizer.kind": "byte", "tokenizer.max_len": 24},
        )
    )


def _encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _save_png(path, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(pixels))
    path.write_bytes(data)
    return data


# ---------------------------------------------------------------------------
# A. bytes that are not UTF-8


def test_csv_with_non_utf8_rows_keeps_every_good_row(tmp_path, caplog):
    for i in range(3):
        _save_png(tmp_path / f"img{i}.png", i)
    (tmp_path / "sub").mkdir()
    rows = [
        b"image,caption",
        b'img0.png,"a first, good caption"',
        b"img1.png,caf\xe9 in latin-1",  # line 3: caption bytes not UTF-8
        b"img2.png,caf\xc3\xa9 in UTF-8",
        b",a row without an image path",
        b"missing.png,a missing image file",
        b"sub,a folder, not an image",
        b"img0.png",  # no caption column
        b"img\x00.png,a NUL in the path",
    ]
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(rows) + b"\r\n")  # with a BOM, as Excel writes
    source = _source(tmp_path, csv_path)
    with caplog.at_level(logging.WARNING):
        source.prepare()
    records = source.builder.as_data_source("train")
    assert len(records) == len(rows) - 1
    assert records[1]["caption"] == b"caf\xe9 in latin-1"  # kept as found, for the pipeline to skip
    warnings = [r.getMessage() for r in caplog.records if "not valid UTF-8" in r.getMessage()]
    assert len(warnings) == 1 and str(csv_path) in warnings[0] and "line(s) 3)" in warnings[0]

    drops = DropCounter()
    arrays = source.eval_arrays(source.tokenizer(), split="train", drops=drops)
    assert sorted(arrays["caption"]) == ["a first, good caption", "café in UTF-8"]
    assert drops.counts == {"bad_caption": 2, "missing_image": 4}


def test_folder_with_a_non_utf8_file_name(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    _save_png(folder / "plain.png", 0)
    (folder / "plain.txt").write_text("a plain name", encoding="utf-8")
    odd = os.path.join(os.fsencode(folder), b"caf\xe9")  # latin-1 file name
    with open(odd + b".png", "wb") as f:
        f.write(_save_png(tmp_path / "scratch.png", 1))
    with open(odd + b".txt", "wb") as f:
        f.write(b"an odd name")
    source = _source(tmp_path, folder)
    arrays = source.eval_arrays(source.tokenizer(), split="train")  # the name once broke the fingerprint
    assert sorted(arrays["caption"]) == ["a plain name", "an odd name"]


# ---------------------------------------------------------------------------
# B. the prepared records follow the image files of a CSV


def test_csv_fingerprint_covers_the_image_files(tmp_path):
    first = [_save_png(tmp_path / f"img{i}.png", i) for i in range(2)]
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("image,caption\nimg0.png,zero\nimg1.png,one\n", encoding="utf-8")
    source = _source(tmp_path, csv_path)
    source.prepare()
    assert [r["image"] for r in source.builder.as_data_source("train")] == first

    # A fixed image: other bytes, a later mtime; the CSV itself is untouched.
    csv_stat = csv_path.stat()
    fixed = _save_png(tmp_path / "img1.png", 7)
    stat = (tmp_path / "img1.png").stat()
    os.utime(tmp_path / "img1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**10))
    assert csv_path.stat() == csv_stat and fixed != first[1]
    again = _source(tmp_path, csv_path)
    again.prepare()
    assert [r["image"] for r in again.builder.as_data_source("train")] == [first[0], fixed]


# ---------------------------------------------------------------------------
# C. image modes


def _png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG of uint16 [H, W] (grey) or [H, W, 3] (RGB) values; PIL cannot write RGB ones."""
    h, w = values.shape[:2]
    color_type = 2 if values.ndim == 3 else 0
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))
    chunk = lambda kind, data: (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    )
    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=-1).astype(np.uint8)


def test_high_bit_depth_images_scale_to_8_bits():
    rng = np.random.default_rng(0)
    # An 8-bit gradient in the high bytes, noise in the low ones: the high byte is kept (v >> 8).
    v16 = (np.arange(256, dtype=np.uint16) * 256 + rng.integers(0, 256, 256, dtype=np.uint16)).reshape(16, 16)
    expected = _grey(v16 >> 8)
    assert expected.max() == 255 and len(np.unique(expected)) == 256

    np.testing.assert_array_equal(decode_image(_png16(v16), 16), expected)  # opens as I;16
    for mode, dtype in (("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2"), ("I", "<i4")):
        im = Image.frombytes(mode, (16, 16), v16.astype(dtype).tobytes())
        np.testing.assert_array_equal(square_rgb(im, 16), expected, err_msg=mode)
        if mode != "I;16L":  # TIFF writes I;16L as I;16
            assert Image.open(io.BytesIO(_encode(im, "TIFF"))).mode == mode
            np.testing.assert_array_equal(decode_image(_encode(im, "TIFF"), 16), expected, err_msg=mode)
    rgb16 = np.stack([v16, v16.T, 65535 - v16], axis=-1)
    np.testing.assert_array_equal(decode_image(_png16(rgb16), 16), (rgb16 >> 8).astype(np.uint8))

    # Float images are taken to lie in [0, 1].
    f = np.linspace(-0.1, 1.1, 256, dtype=np.float32).reshape(16, 16)
    im = Image.frombytes("F", (16, 16), f.tobytes())
    expected = _grey(np.rint(np.clip(f, 0, 1) * 255))
    np.testing.assert_array_equal(decode_image(_encode(im, "TIFF"), 16), expected)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    rgb, alpha = rgba[..., :3].astype(np.float64), rgba[..., 3:].astype(np.float64) / 255
    return np.rint(rgb * alpha + 255 * (1 - alpha)).astype(np.uint8)


def test_palette_and_transparent_images_are_composited_over_white():
    palette = [255, 0, 0, 0, 0, 255, 0, 0, 0, 0, 255, 0]
    indices = np.array([[0, 1, 2, 3]] * 4, np.uint8)
    colours = np.array(palette, np.uint8).reshape(4, 3)
    p = Image.frombytes("P", (4, 4), indices.tobytes())
    p.putpalette(palette)
    np.testing.assert_array_equal(decode_image(_encode(p), 4), colours[indices])
    expected = colours[indices].copy()
    expected[indices == 2] = 255  # index 2 is transparent
    np.testing.assert_array_equal(decode_image(_encode(p, transparency=2), 4), expected)
    np.testing.assert_array_equal(decode_image(_encode(p, "GIF", transparency=2), 4), expected)

    alpha = np.array([[0, 255, 128, 64]] * 4, np.uint8)
    pa = Image.merge("PA", (p, Image.frombytes("L", (4, 4), alpha.tobytes())))
    pa_rgba = np.concatenate([colours[indices], alpha[..., None]], axis=-1)
    np.testing.assert_allclose(square_rgb(pa, 4), _over_white(pa_rgba), atol=1)

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    rgba[0, :, 3], rgba[1, :, 3] = 0, 255
    got = decode_image(_encode(Image.fromarray(rgba)), 8)
    np.testing.assert_allclose(got, _over_white(rgba), atol=1)
    np.testing.assert_array_equal(got[0], 255)
    np.testing.assert_array_equal(got[1], rgba[1, :, :3])

    la = rgba[..., [0, 3]]
    got = decode_image(_encode(Image.fromarray(la)), 8)
    np.testing.assert_allclose(got, _over_white(la[..., [0, 0, 0, 1]]), atol=1)


def _blocks(layout: np.ndarray, block: int = 8) -> np.ndarray:
    """uint8 [h, w, 3] colours -> [h*block, w*block, 3]: flat 8x8 blocks survive JPEG nearly exactly."""
    return layout.repeat(block, axis=0).repeat(block, axis=1)


def test_jpeg_cmyk_and_exif_orientation():
    cmyk = np.array([[[0, 255, 255, 0], [255, 0, 255, 0]], [[0, 0, 0, 128], [255, 255, 0, 0]]], np.uint8)
    c, m, y, k = (cmyk[..., i].astype(np.float64) for i in range(4))
    rgb = np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], axis=-1) / 255
    im = Image.frombytes("CMYK", (16, 16), _blocks(cmyk).tobytes())
    got = decode_image(_encode(im, "JPEG", quality=100), 16)
    np.testing.assert_allclose(got, _blocks(rgb.round().astype(np.uint8)), atol=3)

    # An 8x4 layout of distinct colours, stored sideways with an EXIF orientation tag.
    layout = np.random.default_rng(1).integers(0, 256, (4, 8, 3), dtype=np.uint8)
    stored = Image.fromarray(_blocks(layout))  # 64 wide, 32 high
    for orientation, upright in (
        (6, np.rot90(layout, -1)),
        (8, np.rot90(layout, 1)),
        (3, layout[::-1, ::-1]),
    ):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = _encode(stored, "JPEG", quality=100, subsampling=0, exif=exif.tobytes())
        size = min(upright.shape[:2]) * 8
        got = decode_image(data, size).astype(np.int32)
        h, w = upright.shape[:2]
        top, left = (h - size // 8) // 2, (w - size // 8) // 2
        want = _blocks(upright[top : top + size // 8, left : left + size // 8]).astype(np.int32)
        assert np.abs(got - want).max() <= 3, orientation


# ---------------------------------------------------------------------------
# C. drop counts resume with the data position


def test_record_pipeline_drop_counts_resume_to_the_uninterrupted_totals(tmp_path):
    rows = ["image,caption"]
    for i in range(14):
        if i % 4 == 1:
            rows.append(f"missing{i}.png,no such file {i}")  # dropped when read, as missing_image
        else:
            _save_png(tmp_path / f"img{i}.png", i)
            rows.append(f"img{i}.png,caption {i}")
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    source = _source(tmp_path, csv_path)
    source.prepare()
    tokenizer = source.tokenizer()
    straight = source.train_iterator(tokenizer, seed=0)
    for _ in range(9):
        next(straight)
    want = straight.drop_counts
    assert want["missing_image"] >= 8  # 9 batches of 4 read over 3 epochs of 4 bad rows
    for k in (1, 2, 4, 5):
        first = source.train_iterator(tokenizer, seed=0)
        for _ in range(k):
            next(first)
        state = first.get_state()
        first.close()
        resumed = source.train_iterator(tokenizer, seed=0)
        resumed.set_state(state)
        for _ in range(9 - k):
            next(resumed)
        assert resumed.drop_counts == want, k
        resumed.close()
    straight.close()
