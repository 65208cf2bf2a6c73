"""`data.name = 'tfds'`: a coco_captions-shaped dataset, prepared here, is read (the demo trains
and evaluates on it with one config change, and resumes exactly: test_resume.py).

`tfds.testing.mock_data` cannot stand in for coco_captions here: the coco_captions builder code
imports TensorFlow (not installed), the mock's random `Image` features need TensorFlow to be
encoded, and its random `Sequence({'text', 'id'})` values get different lengths per leaf, which
tfds refuses to serialize. So a tiny real builder with coco_captions' features is prepared into a
temporary directory as ArrayRecord (no download) and read back by name, from its files.
"""

import io
import json
import os
import shutil

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
from tests.helpers import data_config

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40)}
NUM = {"train": 48, "val": 8, "test": 16}
NO_CAPTIONS = 5  # a train example whose captions are all missing or blank
_SKIP_STATS = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)


def _jpeg(color, size) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((*size, 3), color, np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def captions_of(split: str, i: int) -> list[str]:
    """1 to 3 captions, all naming the image's colour; example NO_CAPTIONS has only a blank one."""
    color = list(COLORS)[i % len(COLORS)]
    if split == "train" and i == NO_CAPTIONS:
        return ["   "]
    return [f"a {color} picture {take} of {split} {i}" for take in range(1 + i % 3)]


class TinyCocoCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """coco_captions' features (image, image/filename, image/id, objects, captions) in miniature."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Test data."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2014")]
    code_path = tfds_util.code_path_property(__file__)

    def __init__(self, **kwargs):
        super().__init__(file_format="array_record", **kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "image/filename": tfds.features.Text(),
                    "image/id": np.int64,
                    "objects": tfds.features.Sequence(
                        {
                            "bbox": tfds.features.BBoxFeature(),
                            "label": tfds.features.ClassLabel(num_classes=4),
                        }
                    ),
                    "captions": tfds.features.Sequence({"text": tfds.features.Text(), "id": np.int64}),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split, n) for split, n in NUM.items()}

    def _generate_examples(self, split, num):
        for i in range(num):
            color = i % len(COLORS)
            texts = captions_of(split, i)
            yield (
                f"{split}{i}",
                {
                    "image": _jpeg(list(COLORS.values())[color], (24 + i % 5, 40 - i % 7)),
                    "image/filename": f"{split}_{i}.jpg",
                    "image/id": i,
                    "objects": {"bbox": [tfds.features.BBox(0.1, 0.2, 0.5, 0.6)], "label": [color]},
                    "captions": {"text": texts, "id": list(range(len(texts)))},
                },
            )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds_source")
    TinyCocoCaptions(data_dir=str(root)).download_and_prepare(download_config=_SKIP_STATS)
    return str(root)


def _config(data_dir, **overrides):
    values = {
        "name": "tfds",
        "data_dir": data_dir,
        "tfds_name": "tiny_coco_captions/2014",
        "batch_size": 16,
        "image_size": 16,
        "tokenizer.kind": "byte",
        "tokenizer.max_len": 48,
    }
    values.update(overrides)
    return data_config(**values)


def _source(data_dir, **overrides):
    source = make_source(_config(data_dir, **overrides))
    source.prepare()
    return source


def _captions_by_record(source, split="train") -> list[list[str]]:
    """The non-blank captions of each record (tfds stores the examples in a shuffled order)."""
    raw = source.raw_records(split)
    _, captions = records.read_pairs(raw.__getitems__(list(range(len(raw)))), *source.keys)
    return [[c.decode() for c in texts] for texts in captions]


def test_fast_parse_agrees_with_tfds_generic_decoder(data_dir):
    source = _source(data_dir)
    raw = source.raw_records("train")
    got_images, got_captions = records.read_pairs(raw.__getitems__(list(range(len(raw)))), *source.keys)
    features = source.builder.info.features
    for i in range(len(raw)):
        example = features.deserialize_example_np(raw[i], decoders={"image": tfds.decode.SkipDecoding()})
        assert got_images[i] == example["image"]
        assert got_captions[i] == [t for t in example["captions"]["text"] if t.strip()]
    # The examples the decoder reads: first caption, index = record, text_id of that caption.
    for j, raw in enumerate(source.reader("train")([0, 1, 2])):
        assert raw.image == got_images[j] and raw.caption == got_captions[j][0]
        assert raw.index == j and raw.label == -1
        assert raw.text_id == caption_text_id(got_captions[j][0].decode())


def test_eval_arrays_take_the_first_caption_of_each_image(data_dir):
    source = _source(data_dir, image_size=20)
    arrays = source.eval_arrays(source.tokenizer(), split="test")
    assert arrays["image"].shape == (NUM["test"], 20, 20, 3)
    raw = source.raw_records("test")
    _, captions = records.read_pairs(raw.__getitems__(list(range(NUM["test"]))), *source.keys)
    assert list(arrays["caption"]) == [c[0].decode() for c in captions]
    np.testing.assert_array_equal(arrays["index"], np.arange(NUM["test"]))
    assert np.all(arrays["label"] == -1)
    # The JPEG's colour survives decoding and resizing (non-square images, centre-cropped).
    for image, caption in zip(arrays["image"], arrays["caption"]):
        color = COLORS[caption.split()[1]]
        assert np.abs(image.reshape(-1, 3).mean(0) - color).max() < 12
    assert source.zero_shot_tasks() == {}


def _drawn(source, seed, epochs, ids) -> list[str]:
    """The captions training draws for records `ids` in `epochs` (through the decoder's view)."""
    return [raw.caption.decode() for raw in source.reader("train", seed)(ids, epochs)]


def test_captions_are_drawn_per_epoch_deterministically(data_dir):
    source = _source(data_dir)
    captions = _captions_by_record(source)
    record = next(i for i, texts in enumerate(captions) if len(texts) == 3)
    epochs = np.arange(30)
    by_epoch = _drawn(source, (3, 0), epochs, np.full(30, record))
    # Every caption gets its turn over the epochs, and each draw is a pure function of
    # (seed, epoch, record): asked again, among other records, in another order, it is the same.
    assert set(by_epoch) == set(captions[record])
    again = _drawn(source, (3, 0), np.r_[epochs[::-1], 0, 0], np.r_[np.full(30, record), 7, 8])
    assert again[:30] == by_epoch[::-1]
    assert _drawn(source, (4, 0), epochs, np.full(30, record)) != by_epoch
    assert _drawn(source, (3, 1), epochs, np.full(30, record)) != by_epoch
    # Uniform over the captions.
    draws = tfds_dataset.caption_hash((1, 2), np.arange(30000) // 100, np.arange(30000) % 100)
    assert np.all(np.abs(np.bincount((draws % np.uint64(3)).astype(int)) / 30000 - 1 / 3) < 0.02)


def _batches(iterator, k):
    return [next(iterator) for _ in range(k)]


def test_train_iterator_draws_captions_and_resumes(data_dir):
    source = _source(data_dir)
    tokenizer = source.tokenizer()
    n = NUM["train"]
    captions = _captions_by_record(source)
    no_captions = captions.index([])
    it = source.train_iterator(tokenizer, seed=0)
    batches = _batches(it, 12)  # 4 epochs of 48 records, 16 per batch
    text_ids = {}
    for batch in batches:
        assert set(batch) == set(BATCH_KEYS) and batch["image"].shape == (16, 16, 16, 3)
        for index, text_id in zip(batch["index"], batch["text_id"]):
            options = {caption_text_id(c) for c in captions[int(index)]}
            assert int(text_id) in options
            text_ids.setdefault(int(index), []).append(int(text_id))
    assert no_captions not in text_ids and it.drop_counts["bad_caption"] >= 4  # (and prefetched ones)
    assert set(it.drop_counts) == {"bad_caption"}
    assert sorted(text_ids) == sorted(set(range(n)) - {no_captions})
    # Records with several captions train on more than one of them across the epochs.
    several = [i for i in text_ids if len(captions[i]) > 1]
    varied = [i for i in several if len(set(text_ids[i])) > 1]
    assert len(varied) > 0.5 * len(several)
    # Resuming from a saved state gives the same batches.
    again = source.train_iterator(tokenizer, seed=0)
    _batches(again, 5)
    resumed = source.train_iterator(tokenizer, seed=0)
    resumed.set_state(again.get_state())
    for want, got in zip(batches[5:], _batches(resumed, 7)):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(got[key], want[key])


def test_two_processes_split_each_global_batch(data_dir):
    source = _source(data_dir, batch_size=16)
    tokenizer = source.tokenizer()
    whole = _batches(source.train_iterator(tokenizer, seed=1), 3)
    parts = [
        _batches(source.train_iterator(tokenizer, seed=1, process_index=p, process_count=2), 3)
        for p in (0, 1)
    ]
    no_captions = _captions_by_record(source).index([])
    for k in range(3):
        if no_captions in whole[k]["index"]:
            continue  # a drop shifts the rebatching differently per process
        joined = np.concatenate([parts[0][k]["text_id"], parts[1][k]["text_id"]])
        np.testing.assert_array_equal(np.sort(joined), np.sort(whole[k]["text_id"]))


def test_training_decoder_reads_its_chunk_and_reports_records_by_number(data_dir):
    source = _source(data_dir)
    captions = _captions_by_record(source)
    no_captions = captions.index([])
    good = next(i for i, texts in enumerate(captions) if len(texts) == 3)
    decoder = source.decoder("train", None, seed=(0, 0), keep_captions=True)
    out = decoder({"index": np.array([no_captions, good]), "epoch": np.array([3, 3])})
    assert out["_dropped"] == [(0, no_captions, "bad_caption")] and list(out["index"]) == [good]
    assert list(out["caption"]) == _drawn(source, (0, 0), [3], [good])
    with pytest.raises(TypeError, match="epoch"):
        decoder(np.array([good]))
    # Random crops (per record and epoch) and caption draws together.
    cropping = decoder.with_random_crop((0.3, 0.5), (0, 0))
    assert cropping({"index": np.array([good]), "epoch": np.array([1])})["image"].shape == (1, 16, 16, 3)


def test_splits_keys_and_missing_datasets_are_one_clear_line(data_dir, tmp_path):
    source = _source(data_dir, tfds_train_split="train+val", tfds_eval_split="val[:4]")
    assert len(source.records("train")) == NUM["train"] + NUM["val"] and len(source.records("test")) == 4
    assert source.tfds_split("test") == "val[:4]"

    def error(exc, where=data_dir, **overrides):
        with pytest.raises(exc) as e:
            _source(where, **overrides)
        message = str(e.value)
        assert "\n" not in message
        return message

    assert "'image/filename'" in error(ConfigError, tfds_caption_key="image")
    assert "image features: ['image']" in error(ConfigError, tfds_image_key="image/filename")
    message = error(ConfigError, tfds_caption_key="captions")
    assert "captions/text" in message and "image/filename" in message
    assert "available" in error(ConfigError, tfds_train_split="restval")
    message = error(FileNotFoundError, tfds_name="coco_captions")
    assert "tfds build coco_captions --data_dir" in message and "--file_format array_record" in message
    with pytest.raises(ConfigError, match="data.tfds_name"):
        tfds_dataset.TfdsSource.check_config(_config(data_dir, tfds_name=" "))

    # Stored as TFRecord (what tfds writes by default): a pointer to the conversion.
    version_dir = os.path.join(data_dir, "tiny_coco_captions", "2014", "1.0.0")
    copy = tmp_path / "tiny_coco_captions" / "2014" / "1.0.0"
    shutil.copytree(version_dir, copy)
    info = json.loads((copy / "dataset_info.json").read_text())
    info["fileFormat"] = "tfrecord"
    (copy / "dataset_info.json").write_text(json.dumps(info))
    message = error(ConfigError, str(tmp_path))
    assert "tfds convert_format" in message and "array_record" in message


def test_num_train_is_the_train_splits_size_and_a_contradiction_is_refused(data_dir):
    assert _source(data_dir).settle_num_train() == NUM["train"]  # 0: the dataset's count
    assert _source(data_dir, num_train=NUM["train"]).settle_num_train() == NUM["train"]
    # A split string counts what it selects.
    assert _source(data_dir, tfds_train_split="train[:10]", batch_size=8).settle_num_train() == 10
    with pytest.raises(ConfigError, match=r"^data.num_train: 512 contradicts the 48 training examples"):
        _source(data_dir, num_train=512).settle_num_train()
