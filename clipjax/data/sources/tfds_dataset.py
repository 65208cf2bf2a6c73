"""`data.name = 'tfds'`: any image-text dataset tensorflow-datasets has prepared, by name.

    --config.data.name=tfds --config.data.tfds_name=coco_captions --config.data.data_dir=~/tensorflow_datasets

The dataset must already be prepared in `data.data_dir`, as ArrayRecord (random access): nothing
is downloaded or built at run time. It is opened from its files (`dataset_info.json`,
`features.json`), so neither the builder's code nor TensorFlow is needed.

`data.tfds_image_key` names the image feature (a `tfds.features.Image`, or a string tensor of
encoded bytes) and `data.tfds_caption_key` the caption feature: a text feature or a sequence of
them, `/` walking into nested features ("captions/text" in coco_captions, whose `captions` is a
Sequence of {text, id}). With several captions per image, training takes one per example, drawn
by a hash of (seed, shuffle_seed, epoch, record): every epoch draws afresh, and a resumed run (or
one on more hosts, or with more workers) draws what the uninterrupted one would have. Evaluation
takes the first caption of each image: the retrieval evaluator pairs row i of the image
embeddings with row i of the text embeddings, one caption per image.

Class-labelled datasets (imagenet2012, cifar10, ...): `data.tfds_label_key` names an integer
feature (a ClassLabel, or an int scalar) that becomes each record's `label`, in training batches
and evaluation arrays alike. With `data.tfds_caption_key = ""` the caption is the class's name
(`names[label]`; the decimal number for an int feature without names), so the tokenizer,
`text_id` (equal ids: same class) and everything downstream work unchanged; a record whose label
is negative (unlabelled, as in imagenet2012's test split) then has no caption and is dropped as
bad_caption. Without a label key every record's label is -1, as before.

Decoding: records are `tf.train.Example` protos of all the dataset's features. Only the two keys
(three with a label key) are read from the proto (`clipjax.data.records.read_record`) into the
examples every source hands the one decoder (`clipjax.data.decode`), which decodes, crops and
counts drops as for the other sources. tfds' generic decoder (`deserialize_example_np`, image
left encoded) would add ~190 us per COCO-like record (a 60 KB JPEG, 5 captions, 7 boxes).
Decoding the JPEG to 224 px costs ~2.5 ms either way.
"""

from __future__ import annotations

import functools
import re

from absl import logging
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder, registered

from clipjax import prompts
from clipjax.captions import caption_text_id, decode_caption
from clipjax.data.decode import Raw
from clipjax.data.records import feature_keys, label_feature, read_record
from clipjax.data.sources import classes
from clipjax.data.sources.base import register_source
from clipjax.data.sources.tfds_records import TfdsRecordSource
from clipjax.schema import ConfigError, Field

_EVAL_SPLITS = ("test", "validation", "val")
_ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 whose every output bit depends on every input bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def caption_hash(seed: tuple[int, ...], epochs, records) -> np.ndarray:
    """A uint64 per (epoch, record); modulo the record's number of captions, the one it trains on.

    A pure function of its arguments, so resumable and the same in every worker process and on
    every host; vectorised, where a random generator made per record would cost ~10 us each.
    """
    epochs, records = np.broadcast_arrays(np.asarray(epochs, np.int64), np.asarray(records, np.int64))
    h = np.zeros(records.shape, np.uint64)
    with np.errstate(over="ignore"):
        for part in (*(np.full(records.shape, s % 2**64, np.uint64) for s in seed), epochs, records):
            h = _mix(h ^ (part.astype(np.uint64) + _GOLDEN))
    return h


def _text_id(caption: bytes | None) -> int:
    """The caption's text id (-1 when it is not UTF-8: the decoder drops it as bad_caption)."""
    if caption is not None:
        try:
            return caption_text_id(caption.decode("utf-8").strip())
        except UnicodeDecodeError:
            pass
    return -1


class PairRecords:
    """A tfds split as the decoder's reader: record i as a `Raw` example with its image, a caption,
    its text_id, index=i and its label (-1 without a label key). Evaluation takes each record's
    first caption; training (with `seed`) the one `caption_hash(seed, epoch, record)` draws, modulo
    its number of captions. Without a caption key the caption is the label's class name
    (`class_names[label]`, else its number).
    """

    def __init__(
        self, raw, image_key: str, caption_key: str, label_key: str = "", class_names=None, seed=None
    ):
        self.raw, self.image_key, self.caption_key = raw, image_key, caption_key
        self.label_key, self.class_names = label_key, class_names
        self.seed = None if seed is None else tuple(int(s) for s in seed)
        # Class name captions and their text ids, hashed once per class rather than per record.
        self._class_captions: dict[int, tuple[bytes | None, int]] = {}

    @property
    def needs_epochs(self) -> bool:
        return self.seed is not None

    def class_caption(self, label: int) -> bytes | None:
        """The caption of a class: its name, else its number; None for no class (label < 0)."""
        return self._class_record_fields(label)[0]

    def _class_record_fields(self, label: int) -> tuple[bytes | None, int]:
        fields = self._class_captions.get(label)
        if fields is None:
            caption = None
            if label >= 0 and self.class_names is None:
                caption = str(label).encode()
            elif 0 <= label < len(self.class_names or ()):
                caption = self.class_names[label].encode("utf-8")
            fields = self._class_captions[label] = (caption, _text_id(caption))
        return fields

    def captions(self, raw: bytes) -> tuple[bytes | None, list[bytes], int]:
        """A serialized record's image, captions (its class's name without a caption key), label."""
        image, texts, label = read_record(raw, self.image_key, self.caption_key, self.label_key)
        if not self.caption_key:
            caption = self.class_caption(label)
            texts = [caption] if caption is not None and caption.strip() else []
        return image, texts, label

    def __len__(self) -> int:
        return len(self.raw)

    def __call__(self, ids, epochs=None) -> list[Raw]:
        ids = np.asarray(ids, np.int64).reshape(-1)
        if self.seed is None:
            draws = np.zeros(len(ids), np.uint64)
        elif epochs is None:
            raise TypeError("drawing captions needs each record's epoch ({'index', 'epoch'} chunks)")
        else:
            draws = caption_hash(self.seed, np.asarray(epochs).reshape(-1), ids)
        out = []
        # One record at a time: each image's intermediate copies are freed before the next is
        # read, so they reuse warm memory (keeping a batch of them costs ~80 us per COCO image).
        for raw, draw, record in zip(self.raw.__getitems__(ids.tolist()), draws, ids.tolist()):
            image, texts, label = read_record(raw, self.image_key, self.caption_key, self.label_key)
            if self.caption_key:
                caption = texts[int(draw % np.uint64(len(texts)))] if texts else None
                text_id = _text_id(caption)
            else:
                caption, text_id = self._class_record_fields(label)
            out.append(Raw(record, image, caption, record, text_id, label))
        return out


# ----------------------------------------------------------------------------
# The source.


def _split_names(split: str) -> list[str]:
    """The split names in a tfds split string ("train+restval[:50%]" -> train, restval)."""
    return [re.sub(r"\[.*\]$", "", part.strip()) for part in split.split("+")]


def _no_caption_nor_label() -> ConfigError:
    return ConfigError(
        "data.tfds_caption_key, data.tfds_label_key: set at least one (a text feature for captions, "
        "or an integer class feature whose class names become the captions)"
    )


@register_source
class TfdsSource(TfdsRecordSource):
    name = "tfds"
    FIELDS = {
        "tfds_name": Field(
            "", "the prepared tfds dataset in data_dir: name[/config][:version] (e.g. coco_captions)"
        ),
        "tfds_image_key": Field(
            "image", "its image feature (an Image, or encoded bytes); nested as outer/inner"
        ),
        "tfds_caption_key": Field(
            "captions/text",
            "its caption feature: text or a sequence of texts (one drawn per example per epoch); "
            "nested as outer/inner; empty with tfds_label_key: the label's class name",
        ),
        "tfds_label_key": Field(
            "",
            "an integer class feature (a ClassLabel, or an int scalar) whose value is each record's "
            "label (e.g. label in imagenet2012, cifar10); empty: every label is -1",
        ),
        "tfds_train_split": Field("train", "the split trained on (a tfds split string: train+restval, ...)"),
        "tfds_eval_split": Field("", "the held-out split (empty: test, else validation, else val)"),
        "tfds_tokenizer_records": Field(
            10_000,
            "train records (evenly spaced) whose captions train a sentencepiece tokenizer "
            "(reading one reads its image too)",
            minimum=1,
        ),
        **classes.FIELDS,
    }
    encoded_images = True

    @classmethod
    def check_config(cls, data_config) -> None:
        classes.check_config(data_config)
        if not data_config.tfds_name.strip():
            raise ConfigError("data.tfds_name: name the prepared tfds dataset to read (e.g. coco_captions)")
        for key in ("tfds_image_key", "tfds_train_split"):
            if not getattr(data_config, key).strip():
                raise ConfigError(f"data.{key}: must not be empty")
        if not data_config.tfds_caption_key.strip() and not data_config.tfds_label_key.strip():
            raise _no_caption_nor_label()

    def make_builder(self):
        name, data_dir = self.config.tfds_name.strip(), self.data_dir
        try:
            builder = read_only_builder.builder_from_files(name, data_dir=data_dir)
        except registered.DatasetNotFoundError:
            raise FileNotFoundError(
                f"tfds dataset {name!r} is not prepared in data.data_dir {str(data_dir)!r} (nothing is "
                f"downloaded at run time); prepare it first: tfds build {name.split(':')[0]} "
                f"--data_dir {data_dir} --file_format array_record"
            ) from None
        formats = builder.info.available_file_formats()
        if _ARRAY_RECORD not in formats:
            raise ConfigError(
                f"data.tfds_name: {builder.info.full_name} in {builder.data_dir} is stored as "
                f"{sorted(f.value for f in formats)}, and training reads ArrayRecord (random access); "
                f"convert it: tfds convert_format --dataset_version_dir {builder.data_dir} "
                "--out_file_format array_record"
            )
        if builder.info.file_format != _ARRAY_RECORD:
            builder = tfds.builder_from_directory(builder.data_dir, file_format=_ARRAY_RECORD.value)
        return builder

    def prepare(self) -> None:
        self.keys  # noqa: B018 - opens the dataset and checks the feature keys
        self.label  # noqa: B018
        self.tfds_split("train")
        self.tfds_split("test")

    @functools.cached_property
    def keys(self) -> tuple[str, str]:
        """(image key, caption key), the caption key "" when captions are class names."""
        caption_key = self.config.tfds_caption_key if self.config.tfds_caption_key.strip() else ""
        if not caption_key and not self.label_key:  # (a config not validated by check_config)
            raise _no_caption_nor_label()
        return feature_keys(self.builder, self.config.tfds_image_key, caption_key, self.label_key)

    @functools.cached_property
    def label(self) -> tuple[str, tuple[str, ...] | None]:
        """(label key, class names): ("", None) without a label key."""
        return label_feature(self.builder, self.label_key) if self.label_key else ("", None)

    @property
    def label_key(self) -> str:
        return self.config.tfds_label_key.strip()

    def tfds_split(self, split: str) -> str:
        """The tfds split behind clipjax's "train" and "test" (other names are passed through)."""
        available = list(self.builder.info.splits.keys())
        if split == "train":
            split, key = self.config.tfds_train_split, "tfds_train_split"
        elif split == "test":
            split, key = self.config.tfds_eval_split, "tfds_eval_split"
            if not split:
                found = [s for s in _EVAL_SPLITS if s in available]
                if not found:
                    raise ConfigError(
                        f"data.tfds_eval_split: {self.builder.info.full_name} has none of the splits "
                        f"{list(_EVAL_SPLITS)}; name one of {available}"
                    )
                return found[0]
        else:
            key = "tfds_eval_split"
        missing = [s for s in _split_names(split) if s not in available]
        if missing:
            name = self.builder.info.full_name
            raise ConfigError(f"data.{key}: {name} has no split {missing[0]!r}; available: {available}")
        return split

    def raw_records(self, split: str):
        return self.builder.as_data_source(
            split=self.tfds_split(split), deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
        )

    def records(self, split: str) -> PairRecords:
        return self.reader(split)

    def reader(self, split: str, seed=None, extra_int_fields=()) -> PairRecords:
        return PairRecords(self.raw_records(split), *self.keys, *self.label, seed=seed)

    def zero_shot_tasks(self) -> dict[str, tuple[list[str], list[str]]]:
        """With a label key: `data.class_names`, else the ClassLabel's names (a published
        dataset's as CLIP names them, with its prompts: `prompts.zero_shot_prompts`)."""
        key, names = self.label
        if not key:
            return {}
        spec = self.config.zero_shot_templates
        given = classes.class_names(self.config)
        if given or names is None:
            return classes.label_task(given, spec)
        names, templates = prompts.zero_shot_prompts(self.config.tfds_name, list(names))
        if spec != classes.DEFAULT_TEMPLATES:
            templates = classes.templates(spec)
        return {"label": (names, templates)}

    def caption_texts(self) -> list[str]:
        """Every caption of up to `tfds_tokenizer_records` evenly spaced train records."""
        raw = self.raw_records("train")
        n = len(raw)
        take = min(n, int(self.config.tfds_tokenizer_records))
        ids = np.linspace(0, n - 1, take).round().astype(np.int64) if take else np.zeros(0, np.int64)
        if take < n:
            logging.info("tfds: training the tokenizer on the captions of %d of %d records", take, n)
        pairs = PairRecords(raw, *self.keys, *self.label)
        texts = []
        for start in range(0, take, 1024):
            chunk = raw.__getitems__(ids[start : start + 1024].tolist())
            for caption in (c for r in chunk for c in pairs.captions(r)[1]):
                text = decode_caption(caption)
                if text is not None:
                    texts.append(text)
        return texts
