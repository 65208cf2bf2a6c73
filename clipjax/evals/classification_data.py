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
from clipjax.data.images import WHOLE_IMAGE_RESIZES, decode_image, fit_crop, square_rgb

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


class RawRecords:
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

    def chunks(self, n: int, size: int = _CHUNK, start: int = 0) -> Iterator[list[bytes]]:
        """Records `start` to n (the first n by default), in lists of at most `size`."""
        if self.source is not None:
            for first in range(start, n, size):
                yield list(self.source.__getitems__(list(range(first, min(first + size, n)))))
            return
        chunk: list[bytes] = []
        position = 0  # of the file's first record in the split
        for fi in self.instructions:
            skip, stop = max(start - position, 0), min(fi.take, n - position)
            position += fi.take
            if stop <= skip:
                if position >= n:
                    break
                continue
            for record in _read_tfrecord(fi.filename, fi.skip + skip, stop - skip):
                chunk.append(record)
                if len(chunk) == size:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk


# ----------------------------------------------------------------------------
# Decoding.


def array_image(array: np.ndarray, image_size: int, resize: str = "crop") -> np.ndarray:
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
    box = (0, 0, array.shape[1], array.shape[0]) if resize in WHOLE_IMAGE_RESIZES else None
    return square_rgb(Image.fromarray(array), image_size, Image.BILINEAR, box=box)


def classification_batches(
    name: str,
    data_dir: str,
    split: str,
    image_size: int,
    *,
    batch_size: int = _CHUNK,
    max_examples: int | None = None,
    image_key: str = "image",
    label_key: str = "label",
    num_threads: int | None = None,
    drops=None,
    resize: str = "crop",
) -> Iterator[dict[str, np.ndarray]]:
    """{'image': uint8 [b, S, S, 3], 'label': int32 [b], 'index': int32 [b]} batches of a split
    (its first `max_examples` records when that is > 0), b <= batch_size, read and decoded one
    batch at a time: host memory holds a batch, never the split. Encoded images are decoded on
    `num_threads` threads (default: up to 8, one per CPU). A record whose image cannot be
    decoded or that has no label is skipped and counted in `drops` (a
    `clipjax.data.drops.DropCounter`: 'bad_image', 'no_label'); without `drops` it raises
    ValueError naming the record."""
    image_size = int(image_size)
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    builder = get_builder(name, data_dir)
    image_feature = _feature(
        builder, image_key, (tfds.features.Image, tfds.features.Tensor), "Image or Tensor"
    )
    _feature(builder, label_key, (tfds.features.ClassLabel, tfds.features.Tensor), "label")
    encoded = isinstance(image_feature, tfds.features.Image)
    raw = RawRecords(builder, split)
    n = raw.size if not max_examples else min(int(max_examples), raw.size)
    threads = num_threads or min(8, os.cpu_count() or 1)
    where = f"dataset {name} split {split!r}"

    skipped: list[tuple[int, str]] = []  # this batch's

    def bad(reason: str, index: int, message: str) -> None:
        if drops is None:
            raise ValueError(f"{where}: record {index} {message}")
        skipped.append((index, reason))

    def decode(index_and_bytes) -> np.ndarray | None:
        index, data = index_and_bytes
        if not data:
            bad("bad_image", index, "has no image")
            return None
        try:
            return decode_image(data, image_size, Image.BILINEAR, crop=fit_crop(resize))
        except Exception as e:  # PIL raises many types for corrupt files.
            bad("bad_image", index, f"has an undecodable image ({e})")
            return None

    pool = concurrent.futures.ThreadPoolExecutor(threads) if encoded and threads > 1 else None
    try:
        start = 0
        for chunk in raw.chunks(n, max(1, int(batch_size))):
            indices = range(start, start + len(chunk))
            if encoded:
                fields = records.parse(chunk, (label_key,), (image_key,))
                items = list(zip(indices, fields[image_key]))
                images = list(pool.map(decode, items) if pool else map(decode, items))
                labels = fields[label_key]
            else:
                images, labels = [], []
                for index, record in zip(indices, chunk):
                    example = builder.info.features.deserialize_example_np(record)
                    try:
                        images.append(array_image(example[image_key], image_size, resize))
                    except ValueError as e:
                        bad("bad_image", index, f"has an unusable image tensor ({e})")
                        images.append(None)
                    labels.append(example.get(label_key))
            keep = []
            for index, image, label in zip(indices, images, labels):
                if image is None:
                    continue
                if label is None:
                    bad("no_label", index, "has no label")
                    continue
                keep.append((index, image, int(label)))
            start += len(chunk)
            batch = {
                "image": np.stack([k[1] for k in keep])
                if keep
                else np.zeros((0, image_size, image_size, 3), np.uint8),
                "label": np.asarray([k[2] for k in keep], np.int32),
                "index": np.asarray([k[0] for k in keep], np.int32),
            }
            if drops is not None:
                batch["_dropped"] = [(index, index, reason) for index, reason in skipped]
                batch = drops(batch)
            skipped.clear()
            if keep:
                yield batch
    finally:
        if pool:
            pool.shutdown()
    if start != n:
        raise ValueError(f"{where}: read {start} records, expected {n}")


def split_size(name: str, data_dir: str, split: str) -> int:
    """The number of records of `split` ("test", "train[:10%]", ...)."""
    return RawRecords(get_builder(name, data_dir), split).size


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
    drops=None,
) -> dict[str, np.ndarray]:
    """{'image': uint8 [N, S, S, 3], 'label': int32 [N]} for a split (its first `max_examples`
    records when that is > 0): `classification_batches` gathered in memory, for the small sets
    (probe training examples) that are needed whole. Bad records as there."""
    batches = list(
        classification_batches(
            name,
            data_dir,
            split,
            image_size,
            max_examples=max_examples,
            image_key=image_key,
            label_key=label_key,
            num_threads=num_threads,
            drops=drops,
        )
    )
    if not batches:
        return {
            "image": np.zeros((0, int(image_size), int(image_size), 3), np.uint8),
            "label": np.zeros((0,), np.int32),
        }
    return {key: np.concatenate([b[key] for b in batches]) for key in ("image", "label")}


def split_labels(
    name: str, data_dir: str, split: str, *, max_examples: int | None = None, label_key: str = "label"
) -> np.ndarray:
    """int32 labels of a split's first `max_examples` records (all when 0/None), read without
    decoding any image; records without a label are left out."""
    raw = RawRecords(get_builder(name, data_dir), split)
    n = raw.size if not max_examples else min(int(max_examples), raw.size)
    labels = []
    for chunk in raw.chunks(n):  # a ClassLabel is an int64 in the record, whatever the image
        labels += [v for v in records.parse(chunk, (label_key,), ())[label_key] if v is not None]
    return np.asarray(labels, np.int32)
