"""One decoder serves every source: the same damaged pairs, as a CSV and as a folder
(image_text_folder), as webdataset shards, as tfds records (data.name=tfds) and through the
converter, keep the same examples, pixel for pixel, and drop the others for the same reasons."""

import io
import tarfile

import numpy as np
from PIL import Image

from clipjax.data.prepare import convert
from clipjax.data.drops import DropCounter
from clipjax.data.sources import make_source
from tests.helpers import data_config


def _encoded(fmt: str, size, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


JPEG = _encoded("JPEG", (40, 30), 0)
# file name -> (image file bytes, caption bytes or None for none at all, why it is dropped)
PAIRS = {
    "a.png": (_encoded("PNG", (20, 16), 1), b"a good png", ""),
    "b.jpg": (JPEG, b"a good jpeg", ""),
    "c.png": (_encoded("PNG", (1, 1), 2), b"one pixel: smaller than the crop", ""),
    "d.png": (_encoded("PNG", (8, 5), 3), b"eight by five pixels", ""),
    "e.jpg": (JPEG[: len(JPEG) // 2], b"a truncated jpeg", "bad_image"),
    "f.png": (b"this is not an image", b"text in an image file", "bad_image"),
    "g.png": (b"", b"an empty image file", "missing_image"),
    "h.png": (_encoded("PNG", (20, 16), 4), b"   ", "bad_caption"),
    "i.png": (_encoded("PNG", (20, 16), 5), b"caf\xe9 in latin-1", "bad_caption"),
    "j.png": (_encoded("PNG", (20, 16), 6), None, "bad_caption"),
    "k.png": (b"", b"", "bad_caption"),  # both bad: the caption is checked first, everywhere
}
EXPECTED = {"bad_image": 2, "missing_image": 1, "bad_caption": 4}
KEPT = sorted(caption.decode() for _, caption, why in PAIRS.values() if not why)


def _write(root):
    """The pairs as a folder (images, .txt captions beside them) holding a CSV of the same files,
    and as one webdataset shard; returns (folder, csv, shard)."""
    folder = root / "pairs"
    folder.mkdir()
    rows = [b"image,caption"]
    with tarfile.open(root / "00000.tar", "w") as tar:
        for name, (image, caption, _) in PAIRS.items():
            stem = name.split(".")[0]
            (folder / name).write_bytes(image)
            members = {name: image}
            if caption is not None:
                (folder / f"{stem}.txt").write_bytes(caption)
                members[f"{stem}.txt"] = caption
            rows.append(name.encode() + b"," + (caption or b""))
            for member, data in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (folder / "pairs.csv").write_bytes(b"\n".join(rows) + b"\n")
    return folder, folder / "pairs.csv", root / "00000.tar"


def _read(**settings):
    """(drop counts, arrays sorted by caption) of the source's whole training split."""
    source = make_source(
        data_config(image_size=12, **{"tokenizer.kind": "byte", "tokenizer.max_len": 24}, **settings)
    )
    source.prepare()
    drops = DropCounter()
    arrays = source.eval_arrays(source.tokenizer(), split="train", drops=drops)
    order = np.argsort(arrays["caption"])
    return dict(drops.counts), {k: v[order] for k, v in arrays.items()}, source


def test_every_source_keeps_and_drops_the_same_pairs_for_the_same_reasons(tmp_path):
    folder, csv, shard = _write(tmp_path)
    own = dict(name="image_text_folder", test_fraction=0.0)
    from_csv = _read(**own, source=str(csv), data_dir=str(tmp_path / "csv"))
    read = {
        "csv": from_csv,
        "folder": _read(**own, source=str(folder), data_dir=str(tmp_path / "folder")),
        "webdataset": _read(name="webdataset", shards=str(shard), data_dir=str(tmp_path / "wds")),
        # The CSV's records, bad ones included, read by name as any prepared tfds dataset.
        "tfds": _read(
            name="tfds",
            data_dir=str(tmp_path / "csv"),
            tfds_name=f"image_text_folder/{from_csv[2].builder.builder_config.name}",
            tfds_caption_key="caption",
            tfds_eval_split="train",
        ),
    }
    # The converter leaves the bad pairs out, counted by the same reasons, of either input.
    for name, source in (("csv", csv), ("webdataset", shard)):
        result = convert.convert(
            str(source), str(tmp_path / f"converted_{name}"), test_fraction=0.0, workers=1
        )
        assert result.skipped == EXPECTED, name
        read[f"converted {name}"] = _read(
            name="tfds",
            data_dir=str(tmp_path / f"converted_{name}"),
            tfds_name=f"image_text_folder/{result.config}",
            tfds_caption_key="caption",
            tfds_eval_split="train",
        )
    for name, (drops, arrays, _) in read.items():
        assert drops == ({} if name.startswith("converted") else EXPECTED), name
        assert list(arrays["caption"]) == KEPT, name
        for key in ("image", "text", "text_id"):
            np.testing.assert_array_equal(arrays[key], from_csv[1][key], err_msg=f"{name}: {key}")
