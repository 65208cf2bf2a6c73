"""Image classification datasets that tensorflow-datasets has already prepared in a data dir.

Nothing is downloaded or prepared here, and TensorFlow is not needed: the builder is read back
from its files (`<data_dir>/<name>[/<config>]/<version>/dataset_info.json`), so datasets whose
builder code is not importable here (or needs TensorFlow) load too, by name:

    data = load_classification_split("cifar10", "~/tensorflow_datasets", "test", image_size=224)
    data["image"]  # uint8 [N, 224, 224, 3];  data["label"]  # int32 [N]
    names, templates = zero_shot_task("cifar10", "~/tensorflow_datasets")

`name` may be "name", "name/config", "name:1.2.0" or "name/config:1.2.0"; `split` may be any
tfds split string ("test", "train[:10%]"). Records come in the order tfds stores them.

Images: the feature `image_key` ("image") may be
  * a `tfds.features.Image` (PNG/JPEG bytes, as most image datasets store them): decoded with
    PIL straight from the serialized records (tfds' own numpy decoder would also do it, at several
    times the cost), or
  * a `tfds.features.Tensor` of uint8 [H, W, C] or [H, W]: decoded by tfds.
Each image becomes RGB (grey is repeated, alpha dropped), its shorter side is resized to
`image_size` with PIL's bilinear filter and the centre square is kept (for square images that is
just a resize, and nothing at all when they already have the size asked for). Labels are the
`label_key` ("label") feature, normally a `tfds.features.ClassLabel`.

Files: ArrayRecord datasets are read through `as_data_source`; TFRecord datasets (what tfds writes
by default, e.g. cifar10 or imagenet2012 prepared with TensorFlow) are read sequentially with the
small reader below (record framing only: lengths are trusted, CRCs are not checked).
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import struct
from collections.abc import Iterator

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder
from tensorflow_datasets.core import registered

from clipjax import paths
from clipjax.data import records, tfds_util
from clipjax.data.images import decode_image, square_rgb

# Generic prompts (a subset of CLIP's ImageNet ensemble), fine for photos of everyday classes.
TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "art of the {}.",
)

_CHUNK = 1024
_WORDNET_ID = re.compile(r"^n\d{8}$")
_FileFormat = tfds.core.FileFormat


def _expand(data_dir: str) -> str:
    return paths.resolve(data_dir)


def get_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """The read-only builder of the prepared dataset `name` in `data_dir` (never downloads)."""
    data_dir = _expand(data_dir)
    try:
        return read_only_builder.builder_from_files(name, data_dir=data_dir)
    except registered.DatasetNotFoundError:
        raise FileNotFoundError(
            f"dataset {name!r} is not prepared in data_dir {data_dir!r} (no "
            f"{name.split(':')[0]}/<version>/dataset_info.json there); prepare it with "
            "tensorflow-datasets first, nothing is downloaded here"
        ) from None


def _feature(builder, key: str, kinds: tuple, what: str):
    features = builder.info.features
    if key not in features or not isinstance(features[key], kinds):
        found = {k: type(v).__name__ for k, v in features.items()}
        raise ValueError(f"dataset {builder.name} has no {what} feature {key!r}; its features are {found}")
    return features[key]


def raw_class_names(name: str, data_dir: str, *, label_key: str = "label") -> list[str]:
    """The label feature's class names exactly as the dataset stores them."""
    builder = get_builder(name, data_dir)
    return list(_feature(builder, label_key, (tfds.features.ClassLabel,), "ClassLabel").names)


def class_names(name: str, data_dir: str, *, label_key: str = "label") -> list[str]:
    """Human-readable class names: the ClassLabel names with underscores as spaces.

    Names are otherwise as stored: datasets labelled with WordNet ids (imagenet2012:
    'n01440764', ...) get a warning, since such names mean nothing to a text encoder.
    """
    names = raw_class_names(name, data_dir, label_key=label_key)
    if names and all(_WORDNET_ID.match(n) for n in names):
        logging.warning(
            "dataset %s labels its classes with WordNet ids (%s, ...); zero-shot "
            "prompts need real class names",
            name,
            names[0],
        )
    return [" ".join(n.replace("_", " ").split()) for n in names]


def zero_shot_task(name: str, data_dir: str, *, label_key: str = "label") -> tuple[list[str], list[str]]:
    """(class names, prompt templates) in the form the zero-shot evaluator takes."""
    return class_names(name, data_dir, label_key=label_key), list(TEMPLATES)


# ----------------------------------------------------------------------------
# Reading records.


def _read_tfrecord(path: str, skip: int, take: int) -> Iterator[bytes]:
    """Records [skip, skip + take) of one TFRecord file (framing only, CRCs unchecked)."""
    with epath.Path(path).open("rb") as f:
        for index in range(skip + take):
            header = f.read(12)  # uint64 length, uint32 masked CRC of the length
            if len(header) < 12:
                raise ValueError(f"{path}: file ends at record {index}, expected {skip + take}")
            (length,) = struct.unpack("<Q", header[:8])
            if index < skip:
                f.seek(length + 4, os.SEEK_CUR)
                continue
            data = f.read(length)
            f.read(4)  # masked CRC of the data
            if len(data) < length:
                raise ValueError(f"{path}: record {index} is truncated")
            yield data


class _RawRecords:
    """Serialized records of one split, in chunks, whatever the file format."""

    def __init__(self, builder, split: str):
        tfds_util.check_split(builder, split)
        formats = builder.info.available_file_formats()
        self.source = None
        self.instructions = None
        if _FileFormat.ARRAY_RECORD in formats:
            if builder.info.file_format != _FileFormat.ARRAY_RECORD:
                builder = tfds.builder_from_directory(builder.data_dir, file_format="array_record")
            self.source = builder.as_data_source(
                split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
            )
            self.size = len(self.source)
        elif _FileFormat.TFRECORD in formats:
            self.instructions = builder.info.splits[split].file_instructions
            self.size = sum(fi.take for fi in self.instructions)
        else:
            raise ValueError(
                f"dataset {builder.name} is stored as "
                f"{sorted(f.value for f in formats)}; only array_record and "
                "tfrecord files can be read"
            )

    def chunks(self, n: int) -> Iterator[list[bytes]]:
        """The first n records, in lists of at most _CHUNK."""
        if self.source is not None:
            for start in range(0, n, _CHUNK):
                yield list(self.source.__getitems__(list(range(start, min(start + _CHUNK, n)))))
            return
        chunk: list[bytes] = []
        left = n
        for fi in self.instructions:
            if left <= 0:
                break
            take = min(fi.take, left)
            left -= take
            if take <= 0:
                continue
            for record in _read_tfrecord(fi.filename, fi.skip, take):
                chunk.append(record)
                if len(chunk) == _CHUNK:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk


# ----------------------------------------------------------------------------
# Decoding.


def array_image(array: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 [H, W], [H, W, 1|3|4] -> uint8 [S, S, 3] (see the module docstring)."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"image tensors must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape == (image_size, image_size, 3):
        return array
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"image tensors must be [H, W] or [H, W, 1|3|4], got {array.shape}")
    return square_rgb(Image.fromarray(array), image_size, Image.BILINEAR)


def load_classification_split(
    name: str,
    data_dir: str,
    split: str,
    image_size: int,
    max_examples: int | None = None,
    *,
    image_key: str = "image",
    label_key: str = "label",
    num_threads: int | None = None,
) -> dict[str, np.ndarray]:
    """{'image': uint8 [N, S, S, 3], 'label': int32 [N]} for a split (its first `max_examples`
    records when that is > 0). Encoded images are decoded on `num_threads` threads (default:
    up to 8, one per CPU). An image that cannot be decoded raises ValueError naming its record.
    """
    image_size = int(image_size)
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    builder = get_builder(name, data_dir)
    image_feature = _feature(
        builder, image_key, (tfds.features.Image, tfds.features.Tensor), "Image or Tensor"
    )
    _feature(builder, label_key, (tfds.features.ClassLabel, tfds.features.Tensor), "label")
    encoded = isinstance(image_feature, tfds.features.Image)
    raw = _RawRecords(builder, split)
    n = raw.size if not max_examples else min(int(max_examples), raw.size)
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    labels = np.empty((n,), np.int32)
    threads = num_threads or min(8, os.cpu_count() or 1)
    pool = concurrent.futures.ThreadPoolExecutor(threads) if encoded and threads > 1 else None
    where = f"dataset {name} split {split!r}"

    def decode(index_and_bytes) -> np.ndarray:
        index, data = index_and_bytes
        if not data:
            raise ValueError(f"{where}: record {index} has no image")
        try:
            return decode_image(data, image_size, Image.BILINEAR)
        except Exception as e:  # PIL raises many types for corrupt files.
            raise ValueError(f"{where}: record {index} has an undecodable image ({e})") from e

    try:
        start = 0
        for chunk in raw.chunks(n):
            stop = start + len(chunk)
            if encoded:
                fields = records.parse(chunk, (label_key,), (image_key,))
                if any(v is None for v in fields[label_key]):
                    raise ValueError(f"{where}: a record in [{start}, {stop}) has no label")
                labels[start:stop] = fields[label_key]
                items = list(enumerate(fields[image_key], start))
                decoded = pool.map(decode, items) if pool else map(decode, items)
                for i, image in enumerate(decoded, start):
                    images[i] = image
            else:
                for i, record in enumerate(chunk, start):
                    example = builder.info.features.deserialize_example_np(record)
                    images[i] = array_image(example[image_key], image_size)
                    labels[i] = int(example[label_key])
            start = stop
    finally:
        if pool:
            pool.shutdown()
    if start != n:
        raise ValueError(f"{where}: read {start} records, expected {n}")
    return {"image": images, "label": labels}
