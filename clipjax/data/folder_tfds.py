"""tensorflow-datasets builder `image_text_folder` for a user's own image-text pairs.

`source` is either
  * a CSV file with a header and columns `image,caption`; image paths are
    relative to the CSV's folder or absolute, or
  * a folder (searched recursively) of image files, each with a caption in a
    same-named `.txt` file beside it (`cat.jpg` + `cat.txt`).

Records keep the encoded image bytes and the raw caption bytes as found: the
input pipeline decodes them, so a corrupt image or an unreadable caption is
skipped and counted there rather than failing the preparation. A missing image
file or caption file is stored as empty bytes, which the pipeline skips too.

The config name is derived from the source path and a fingerprint of its
listing, so different sources (or a changed one) never share a directory.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import re
import zlib

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from clipjax.data import shapes
from clipjax.data import tfds_util

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclasses.dataclass(eq=False, kw_only=True)
class FolderConfig(tfds.core.BuilderConfig):
    source: str = ""
    test_fraction: float = 0.0


def _check_source(source: str) -> str:
    path = os.path.abspath(os.path.expanduser(source))
    if not source or not os.path.exists(path):
        raise FileNotFoundError(
            f"data.source {path!r} does not exist (expected a CSV file or a folder of images)"
        )
    return path


def _list_folder(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(root, name))
    return found


def _fingerprint(path: str) -> str:
    """Changes when the CSV file, or the files in the folder, change."""
    h = hashlib.sha1(path.encode())
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                st = os.stat(os.path.join(root, name))
                h.update(
                    f"{os.path.relpath(os.path.join(root, name), path)}|{st.st_size}|"
                    f"{st.st_mtime_ns}\n".encode()
                )
    else:
        st = os.stat(path)
        h.update(f"{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def make_config(source: str, test_fraction: float = 0.0) -> FolderConfig:
    path = _check_source(source)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    slug = re.sub(r"[^a-z0-9]+", "_", os.path.basename(path).lower()).strip("_") or "data"
    name = f"{slug}_{_fingerprint(path)}"
    if test_fraction:
        name += f"_test{round(test_fraction * 1e4)}"
    return FolderConfig(
        name=name, source=path, test_fraction=test_fraction, description=f"image-text pairs from {path}"
    )


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _pairs(source: str) -> list[tuple[str, str | None, bytes | None]]:
    """(key, image path, caption bytes or None when it comes from a .txt file)."""
    if os.path.isdir(source):
        pairs = []
        for image in _list_folder(source):
            pairs.append((os.path.relpath(image, source), image, None))
        return pairs
    base = os.path.dirname(source)
    with open(source, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"image", "caption"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"CSV {source!r} lacks column(s) {sorted(missing)}; "
                "it needs a header with columns image,caption"
            )
        pairs = []
        for row in reader:
            rel = (row["image"] or "").strip()
            image = rel if os.path.isabs(rel) else os.path.join(base, rel)
            pairs.append((rel, image, (row["caption"] or "").encode("utf-8")))
    return pairs


class ImageTextFolder(tfds.core.GeneratorBasedBuilder):
    """Image-text pairs from a CSV file or a folder; see module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def __init__(self, *, file_format: str | None = "array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    code_path = tfds_util.code_path_property(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        int32 = lambda: tfds.features.Tensor(shape=(), dtype=np.int32)
        return tfds.core.DatasetInfo(
            builder=self,
            description="User image-text pairs; images kept encoded.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "caption": tfds.features.Text(),
                    "text_id": int32(),
                    "index": int32(),
                    "label": int32(),
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        config = self.builder_config
        if not isinstance(config, FolderConfig) or not config.source:
            raise ValueError("image_text_folder needs config=folder_tfds.make_config(source)")
        pairs = _pairs(_check_source(config.source))
        if not pairs:
            raise ValueError(f"data.source {config.source!r} holds no image-caption pairs")
        # Hash of the path, so adding files does not move old ones across splits.
        threshold = int(config.test_fraction * 2**32)
        is_test = [zlib.crc32(key.encode()) < threshold for key, _, _ in pairs]
        splits = {"train": [p for p, t in zip(pairs, is_test) if not t]}
        if config.test_fraction:
            splits["test"] = [p for p, t in zip(pairs, is_test) if t]
        return {name: self._generate_examples(items) for name, items in splits.items()}

    def _generate_examples(self, pairs):
        missing = 0
        for i, (_, image_path, caption) in enumerate(pairs):
            image = _read_bytes(image_path)
            if caption is None:
                caption = _read_bytes(os.path.splitext(image_path)[0] + ".txt")
            caption = caption.strip()
            missing += not image
            try:
                text_id = shapes.caption_text_id(caption.decode("utf-8"))
            except UnicodeDecodeError:
                text_id = -1
            yield i, {"image": image, "caption": caption, "text_id": text_id, "index": i, "label": -1}
        if missing:
            logging.warning(
                "image_text_folder: %d image file(s) missing or unreadable; "
                "the input pipeline will skip them",
                missing,
            )


def folder_builder(data_dir: str, source: str, test_fraction: float = 0.0) -> ImageTextFolder:
    return ImageTextFolder(data_dir=data_dir, config=make_config(source, test_fraction))


def prepare_folder(data_dir: str, source: str, test_fraction: float = 0.0) -> ImageTextFolder:
    """Returns the `image_text_folder` builder for `source`, prepared if needed."""
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    config = make_config(source, test_fraction)
    return tfds_util.prepare_once(lambda: ImageTextFolder(data_dir=data_dir, config=config), data_dir)
