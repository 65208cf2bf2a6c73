"""`data.name = 'tfds'` on a class-labelled dataset (imagenet2012, cifar10): labels and class-name captions.

A tiny builder is prepared into a temporary directory as ArrayRecord (no download), as in
tests/test_tfds_dataset.py. Each example's image is its class's colour, so a batch shows whether
images, labels and captions stayed together; an `id` feature says which example a record holds
(tfds stores them shuffled).
"""

import io

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from clipjax.data import records
from clipjax.data.decode import BATCH_KEYS
from clipjax.captions import caption_text_id
from clipjax.data.sources import make_source
from clipjax.data.sources import tfds_dataset
from clipjax.data import tfds_util
from clipjax.schema import ConfigError
from tests.helpers import data_config, tiny_demo

NAMES = ["cat", "dog", "fish"]
COLORS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]
NUM = {"train": 30, "test": 9}
UNLABELLED = 4  # a train example with label -1 (as in imagenet2012's test split)
_SKIP_STATS = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)


def label_of(split: str, i: int) -> int:
    return -1 if (split, i) == ("train", UNLABELLED) else i % len(NAMES)


def caption_of(split: str, i: int) -> str:
    return f"photo {i} of the {split} split"


def _png(color) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((12, 18, 3), color, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class TinyClasses(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """image (PNG), label (ClassLabel), plus an int id and a text caption."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Test data."}
    code_path = tfds_util.code_path_property(__file__)

    def __init__(self, **kwargs):
        super().__init__(file_format="array_record", **kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=NAMES),
                    "id": np.int64,
                    "caption": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split, n) for split, n in NUM.items()}

    def _generate_examples(self, split, num):
        for i in range(num):
            label = label_of(split, i)
            yield (
                f"{split}{i}",
                {
                    "image": _png(COLORS[i % len(NAMES)]),
                    "label": label,
                    "id": i,
                    "caption": caption_of(split, i),
                },
            )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds_labels")
    TinyClasses(data_dir=str(root)).download_and_prepare(download_config=_SKIP_STATS)
    return str(root)


def _config(data_dir, **overrides):
    values = {
        "name": "tfds",
        "data_dir": data_dir,
        "tfds_name": "tiny_classes",
        "tfds_caption_key": "",
        "tfds_label_key": "label",
        "batch_size": 8,
        "image_size": 8,
        "tokenizer.kind": "byte",
        "tokenizer.max_len": 32,
    }
    values.update(overrides)
    return data_config(**values)


def _source(data_dir, **overrides):
    source = make_source(_config(data_dir, **overrides))
    source.prepare()
    return source


def _ids(source, split: str) -> np.ndarray:
    """The example number (`id`) each record of the split holds."""
    raw = source.raw_records(split)
    return np.array(records.parse(raw.__getitems__(list(range(len(raw)))), ("id",), ())["id"])


def _check_colors(images, labels):
    for image, label in zip(images, labels):
        assert np.abs(image.reshape(-1, 3).mean(0) - COLORS[label]).max() < 3


def test_train_batches_carry_each_records_label_and_its_class_name(data_dir):
    source = _source(data_dir)
    ids = _ids(source, "train")
    it = source.train_iterator(source.tokenizer(), seed=0)
    seen = {}
    for _ in range(2 * NUM["train"] // 8):
        batch = next(it)
        assert set(batch) == set(BATCH_KEYS)
        for index, label, text_id in zip(batch["index"], batch["label"], batch["text_id"]):
            assert label == label_of("train", ids[index]) and text_id == caption_text_id(NAMES[label])
            seen[int(index)] = int(label)
        _check_colors(batch["image"], batch["label"])
        # The tokens are the class name's: the same class, the same text.
        for text, label in zip(batch["text"], batch["label"]):
            np.testing.assert_array_equal(text, source.tokenizer().encode([NAMES[label]])[0])
    # The unlabelled example has no class name to caption it: dropped, as a missing caption is.
    unlabelled = int(np.flatnonzero(ids == UNLABELLED)[0])
    assert sorted(seen) == sorted(set(range(NUM["train"])) - {unlabelled})
    assert it.drop_counts["bad_caption"] >= 2 and set(it.drop_counts) == {"bad_caption"}
    assert len({caption_text_id(n) for n in NAMES}) == len(NAMES)
    # The tokenizer trains on the captions records have: class names.
    assert sorted(set(source.caption_texts())) == NAMES


def test_eval_arrays_carry_labels_and_class_name_captions(data_dir):
    source = _source(data_dir)
    arrays = source.eval_arrays(source.tokenizer(), split="test")
    labels = [label_of("test", i) for i in _ids(source, "test")]
    np.testing.assert_array_equal(arrays["index"], np.arange(NUM["test"]))
    np.testing.assert_array_equal(arrays["label"], labels)
    assert list(arrays["caption"]) == [NAMES[label] for label in labels]
    np.testing.assert_array_equal(arrays["text_id"], [caption_text_id(NAMES[label]) for label in labels])
    _check_colors(arrays["image"], arrays["label"])


def test_an_image_text_dataset_with_a_label_key_gets_both(data_dir):
    source = _source(data_dir, tfds_caption_key="caption")
    ids = _ids(source, "train")
    batch = next(source.train_iterator(source.tokenizer(), seed=0))
    for index, label, text_id in zip(batch["index"], batch["label"], batch["text_id"]):
        i = ids[index]
        assert label == label_of("train", i) and text_id == caption_text_id(caption_of("train", i))
    # The unlabelled example keeps its caption and trains, with label -1.
    unlabelled = int(np.flatnonzero(ids == UNLABELLED)[0])
    raw = source.reader("train")([unlabelled])[0]
    assert (raw.label, raw.caption) == (-1, caption_of("train", UNLABELLED).encode())
    arrays = source.eval_arrays(source.tokenizer(), split="test")
    test_ids = _ids(source, "test")
    np.testing.assert_array_equal(arrays["label"], [label_of("test", i) for i in test_ids])
    assert list(arrays["caption"]) == [caption_of("test", i) for i in test_ids]
    # Without a label key (the image-text default), labels stay -1.
    plain = _source(data_dir, tfds_caption_key="caption", tfds_label_key="")
    assert np.all(plain.eval_arrays(plain.tokenizer(), split="test")["label"] == -1)


def test_an_int_feature_without_names_captions_by_number(data_dir):
    source = _source(data_dir, tfds_label_key="id")
    arrays = source.eval_arrays(source.tokenizer(), split="test")
    np.testing.assert_array_equal(arrays["label"], _ids(source, "test"))
    assert list(arrays["caption"]) == [str(i) for i in _ids(source, "test")]


def test_wrong_or_missing_keys_are_one_clear_line(data_dir):
    def error(**overrides):
        with pytest.raises(ConfigError) as e:
            _source(data_dir, **overrides)
        assert "\n" not in str(e.value)
        return str(e.value)

    for key in ("caption", "image", "labels"):
        message = error(tfds_label_key=key)
        assert "data.tfds_label_key" in message and "integer features: ['id', 'label']" in message
    message = error(tfds_label_key="")
    assert "data.tfds_caption_key" in message and "data.tfds_label_key" in message
    with pytest.raises(ConfigError, match="data.tfds_label_key"):
        tfds_dataset.TfdsSource.check_config(_config(data_dir, tfds_label_key=" "))
    # The default caption key on a dataset without it: the message says the key may be empty.
    message = error(tfds_caption_key="captions/text")
    assert "its text features: ['caption']" in message and "empty: captions are" in message


def test_class_names_reach_zero_shot_knn_and_the_probes(data_dir, tmp_path):
    from clipjax import trainer as train_lib

    source = _source(data_dir)
    names, templates = source.zero_shot_tasks()["label"]
    assert names == NAMES and len(templates) == 80  # the ClassLabel's names, CLIP's prompts
    given = _source(data_dir, class_names="a cat,a dog,a fish", zero_shot_templates="a photo of {}.")
    assert given.zero_shot_tasks() == {"label": (["a cat", "a dog", "a fish"], ["a photo of {}."])}
    assert _source(data_dir, tfds_caption_key="caption", tfds_label_key="").zero_shot_tasks() == {}

    data = {"name": "tfds", "tfds_name": "tiny_classes", "tfds_caption_key": "", "tfds_label_key": "label"}
    data.update({"batch_size": 8, "image_size": 8, "tokenizer.kind": "byte", "num_train": 0})
    config = tiny_demo(data_dir, steps=2, log_every=1, **{f"data.{k}": v for k, v in data.items()})
    config.evals.knn.train_examples = config.evals.linear_probe.train_examples = 16
    report = train_lib.train(config, str(tmp_path / "run"), log=lambda _: None)
    assert "skipped" not in report, report.get("skipped")
    assert set(report["zero_shot"]["label"]["per_class"]) == set(NAMES)
    # Solid colours, one per class: learnable from the frozen image features.
    assert report["knn"]["top1@k1"] == 1.0 and report["linear_probe"]["top1"] >= 0.9
