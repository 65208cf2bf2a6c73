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
The same holds for a CSV row whose bytes are not UTF-8: its caption keeps its
bytes (and the pipeline skips it), the other rows are unaffected.

The config name is derived from the source path and a fingerprint of its
contents (the CSV's bytes and, for a CSV or a folder, every file's path, size
and mtime), so different sources, or a changed one, never share a directory.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
import posixpath
import re
from typing import Sequence
import zlib

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from clipjax import paths
from clipjax.captions import caption_text_id
from clipjax.data import tfds_util
from clipjax.schema import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclasses.dataclass(eq=False, kw_only=True)
class FolderConfig(tfds.core.BuilderConfig):
    source: str = ""
    test_fraction: float = 0.0
    label_names: tuple[str, ...] = ()  # class names in label order, when the labels are names


def _check_source(source: str) -> str:
    """The source as an absolute path or bucket URL; FileNotFoundError if it is not there."""
    path = paths.resolve(source) if source else ""
    if not source or not paths.exists(path):
        raise FileNotFoundError(
            f"data.source {path!r} does not exist (expected a CSV file or a folder of images)"
        )
    return path


def _list_folder(folder: str) -> list[str]:
    if paths.is_remote(folder):
        names = paths.files_under(folder)
        return [paths.join(folder, name) for name in names if name.lower().endswith(IMAGE_EXTENSIONS)]
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(root, name))
    return found


def _utf8(text: str) -> bytes:
    """Text back to its bytes, even where it came from bytes that are not UTF-8 (file names, CSV)."""
    return text.encode("utf-8", "surrogateescape")


def _stat_line(key: str, path: str | None, listed: dict[str, str] | None = None) -> bytes:
    """`key|size|version` of one file; `listed` ({url: version}, from one listing of a bucket
    folder) saves a request per object."""
    if path and paths.is_remote(path):
        found = (listed or {}).get(paths.resolve(path)) or paths.content_version(path) or "missing"
        return _utf8(f"{key}|{found}\n")
    try:
        st = os.stat(path) if path else None
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        st = None
    found = f"{st.st_size}|{st.st_mtime_ns}" if st else "missing"
    return _utf8(f"{key}|{found}\n")


def _fingerprint(path: str) -> str:
    """Changes when the CSV file, any image it names, or any file in the folder changes."""
    h = hashlib.sha1(_utf8(path))
    if paths.is_remote(path) and paths.isdir(path):
        for rel, version in paths.versions_under(path).items():
            h.update(_utf8(f"{rel}|{version}\n"))
    elif os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                file = os.path.join(root, name)
                h.update(_stat_line(os.path.relpath(file, path), file))
    else:
        # The bytes rather than size and mtime: the CSV is read here anyway. Images are only
        # stat'ed, so a fixed or replaced image (same CSV) still makes a new directory.
        data = paths.read_bytes(path)
        h.update(data)
        listed = None
        if paths.is_remote(path):  # one listing of the CSV's folder, not a request per image
            folder = posixpath.dirname(path)
            listed = {posixpath.join(folder, rel): v for rel, v in paths.versions_under(folder).items()}
        for key, image, _, _ in _csv_pairs(path, data)[0]:
            h.update(_stat_line(key, image, listed))
    return h.hexdigest()[:12]


def make_config(source: str, test_fraction: float = 0.0, label_names: Sequence[str] = ()) -> FolderConfig:
    """The config of `source`'s dataset, named after the source, a fingerprint of its files and,
    when the labels are names, of the name list that numbers them (an evaluation CSV numbered
    with the training CSV's names is another dataset than the same CSV numbered alone)."""
    path = _check_source(source)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    slug = re.sub(r"[^a-z0-9]+", "_", os.path.basename(path).lower()).strip("_") or "data"
    name = f"{slug}_{_fingerprint(path)}"
    if test_fraction:
        name += f"_test{round(test_fraction * 1e4)}"
    label_names = tuple(label_names)
    if label_names:
        name += "_labels" + hashlib.sha1(_utf8("\n".join(label_names))).hexdigest()[:8]
    return FolderConfig(
        name=name,
        source=path,
        test_fraction=test_fraction,
        label_names=label_names,
        description=f"image-text pairs from {path}",
    )


def _read_bytes(path: str | None) -> bytes:
    if not path:
        return b""
    try:
        if paths.is_remote(path):
            return paths.read_bytes(path)
        with open(path, "rb") as f:
            return f.read()
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return b""


# (key, image path, caption bytes or None for a .txt beside the image, label text or None)
RawPair = tuple[str, str | None, bytes | None, str | None]
# The same with the label as a number: -1 for none.
Pair = tuple[str, str | None, bytes | None, int]


def _csv_rows(source: str, data: bytes | None = None):
    """Yields (line number, cells) for the CSV's non-blank rows, whatever their bytes.

    Bytes that are not UTF-8 become lone surrogates (surrogateescape), so one stray byte costs
    only its row's caption instead of the whole file, and `_utf8` gives the bytes back exactly.
    """
    data = paths.read_bytes(source) if data is None else data
    text = data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")  # Excel's BOM
    reader = csv.reader(io.StringIO(text, newline=""))
    while True:
        line = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # e.g. an unclosed quote running into the field size limit
            raise ValueError(f"CSV {source!r} line {line}: {e}") from e
        if cells:  # blank lines, as csv.DictReader skips them
            yield line, cells


def _csv_pairs(source: str, data: bytes | None = None) -> tuple[list[RawPair], list[int]]:
    """The pairs of a CSV (with the optional `label` column's text), and the line numbers of the
    rows whose caption is not UTF-8."""
    rows = _csv_rows(source, data)
    header = [cell.strip() for cell in next(rows, (0, []))[1]]
    missing = {"image", "caption"} - set(header)
    if missing:
        raise ValueError(
            f"CSV {source!r} lacks column(s) {sorted(missing)}; "
            "it needs a header with columns image,caption (UTF-8 text)"
        )
    column = {name: header.index(name) for name in ("image", "caption", "label") if name in header}
    base = os.path.dirname(source)
    pairs, bad_lines = [], []
    for line, cells in rows:
        cell = lambda name: cells[column[name]] if column.get(name, len(cells)) < len(cells) else ""
        rel, caption = cell("image").strip(), cell("caption")
        # No path is a missing image, not the CSV's folder (whose mtime would enter the fingerprint).
        # A path in a bucket CSV is a key below the CSV's folder; a URL is taken as it is.
        image = (
            (
                rel
                if os.path.isabs(rel) or paths.is_remote(rel)
                else (posixpath if paths.is_remote(base) else os.path).join(base, rel)
            )
            if rel
            else None
        )
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError:
            bad_lines.append(line)
        pairs.append((rel, image, _utf8(caption), cell("label").strip() or None))
    return pairs, bad_lines


def _is_number(text: str) -> bool:
    return text.lstrip("-").isdigit()


def label_names(*sources: str) -> tuple[str, ...]:
    """The class names that number the labels of `sources` (a training CSV and its evaluation
    CSV, say), sorted: () when they have no labels or their labels are numbers already.

    Labels come from a CSV's optional `label` column (numbers, or names), or, for a folder whose
    images all sit in class subfolders (at least two; the ImageFolder layout), from the name of
    each image's subfolder."""
    texts = {label for source in sources for *_, label in _pairs(_check_source(source), warn=False) if label}
    if not texts or all(_is_number(t) for t in texts):
        return ()
    return tuple(sorted(texts))


def source_pairs(source: str, names: Sequence[str] = ()) -> list[Pair]:
    """(key, image path, caption bytes or None when it comes from a .txt file, label) of a CSV or
    folder: the label is the index of its text in `names` (`label_names`), the number written in
    a `label` column when the labels are numbers, and -1 when there is none."""
    index = {name: i for i, name in enumerate(names)}
    out = []
    for key, image, caption, text in _pairs(_check_source(source)):
        if text is None:
            label = -1
        elif text in index:
            label = index[text]
        elif _is_number(text):
            label = int(text)
        else:
            raise ValueError(f"{source!r}: label {text!r} of {key!r} is not one of the class names")
        out.append((key, image, caption, label))
    return out


def _pairs(source: str, warn: bool = True) -> list[RawPair]:
    if paths.isdir(source):
        keys = [(paths.relative(image, source), image) for image in _list_folder(source)]
        classes = [
            key.replace(os.sep, "/").split("/")[0] if "/" in key.replace(os.sep, "/") else None
            for key, _ in keys
        ]
        if None in classes or len(set(classes)) < 2:
            classes = [None] * len(keys)  # not the class-subfolder layout: no labels
        return [(key, image, None, label) for (key, image), label in zip(keys, classes)]
    pairs, bad_lines = _csv_pairs(source)
    if bad_lines and warn:
        shown = ", ".join(map(str, bad_lines[:20])) + (", ..." if len(bad_lines) > 20 else "")
        logging.warning(
            "image_text_folder: CSV %s: %d row(s) are not valid UTF-8 (line(s) %s); their records are "
            "kept and the input pipeline will skip them as bad captions",
            source,
            len(bad_lines),
            shown,
        )
    return pairs


def features() -> tfds.features.FeaturesDict:
    """The records' features (also what `clipjax.data.convert` writes)."""
    int32 = lambda: tfds.features.Tensor(shape=(), dtype=np.int32)
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "caption": tfds.features.Text(),
            "text_id": int32(),
            "index": int32(),
            "label": int32(),
        }
    )


def is_test(key: str, test_fraction: float) -> bool:
    """Held out by a hash of the key (the path), so adding files does not move old ones across splits."""
    return zlib.crc32(_utf8(key)) < int(test_fraction * 2**32)


def split_pairs(
    pairs: list[Pair], test_fraction: float, setting: str = "data.test_fraction"
) -> dict[str, list[Pair]]:
    """{'train': pairs, 'test': pairs (only with test_fraction > 0)}, each in the source's order.
    ConfigError naming `setting` (the config key, or the converter's flag) when the hash leaves a
    split empty (a small source and a small fraction): tfds refuses to write an empty split, with
    an assertion that names neither cause nor remedy."""
    held_out = [is_test(pair[0], test_fraction) for pair in pairs]
    splits = {"train": [p for p, t in zip(pairs, held_out) if not t]}
    if test_fraction:
        splits["test"] = [p for p, t in zip(pairs, held_out) if t]
        empty = [name for name, items in splits.items() if not items]
        if empty:
            elsewhere = ", data.eval_source," if setting.startswith("data.") else ","
            raise ConfigError(
                f"{setting}: {test_fraction:g} of the {len(pairs)} pairs leaves the "
                f"{empty[0]} split empty (files are held out by a hash of their path); give a "
                f"fraction that holds out some but not all{elsewhere} or 0 for no test split"
            )
    return splits


def read_pair(image_path: str | None, caption: bytes | None) -> tuple[bytes, bytes]:
    """The image file's bytes and the caption's (from the .txt file beside the image when
    `caption` is None); b"" for a file that is missing or unreadable."""
    image = _read_bytes(image_path)
    if caption is None:  # a folder: the caption file beside the image
        caption = _read_bytes(os.path.splitext(image_path)[0] + ".txt")
    return image, caption


def make_example(index: int, image: bytes, caption: bytes, label: int = -1) -> dict:
    """The record of one pair (`features()`): image bytes as found, the caption stripped."""
    caption = caption.strip()
    try:
        text_id = caption_text_id(caption.decode("utf-8"))
    except UnicodeDecodeError:
        text_id = -1
    return {"image": image, "caption": caption, "text_id": text_id, "index": index, "label": int(label)}


class ImageTextFolder(tfds.core.GeneratorBasedBuilder):
    """Image-text pairs from a CSV file or a folder; see module docstring."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Labels from a CSV `label` column or class subfolders (-1 without).",
    }

    def __init__(self, *, file_format: str | None = "array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    code_path = tfds_util.code_path_property(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="User image-text pairs; images kept encoded.",
            features=features(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        config = self.builder_config
        if not isinstance(config, FolderConfig) or not config.source:
            raise ValueError("image_text_folder needs config=make_config(source)")
        pairs = source_pairs(config.source, config.label_names)
        if not pairs:
            raise ValueError(f"data.source {config.source!r} holds no image-caption pairs")
        splits = split_pairs(pairs, config.test_fraction)
        return {name: self._generate_examples(items) for name, items in splits.items()}

    def _generate_examples(self, pairs):
        missing = 0
        for i, (_, image_path, caption, label) in enumerate(pairs):
            example = make_example(i, *read_pair(image_path, caption), label)
            missing += not example["image"]
            yield i, example
        if missing:
            logging.warning(
                "image_text_folder: %d image file(s) missing or unreadable; "
                "the input pipeline will skip them",
                missing,
            )


def prepare_folder(
    data_dir: str, source: str, test_fraction: float = 0.0, label_names: Sequence[str] = ()
) -> ImageTextFolder:
    """Returns the `image_text_folder` builder for `source`, prepared if needed; `data_dir` may be
    a bucket URL (`tfds_util.prepare_in_bucket`), as for the shapes builder."""
    config = make_config(source, test_fraction, label_names)
    if paths.is_remote(data_dir):
        return tfds_util.prepare_in_bucket(
            lambda local: ImageTextFolder(data_dir=local, config=config), data_dir
        )
    data_dir = paths.resolve(data_dir)
    return tfds_util.prepare_once(lambda: ImageTextFolder(data_dir=data_dir, config=config), data_dir)
