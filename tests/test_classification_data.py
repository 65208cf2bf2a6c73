"""Loading prepared tfds image-classification datasets, built here without TensorFlow.

`tfds.features.Image` needs TensorFlow only to encode numpy arrays; given encoded bytes it stores
them as they are. So the builder below yields PNG bytes made with PIL, and tfds writes a normal
Image-feature dataset (what cifar10 or imagenet2012 look like on disk).
"""

import io
import json
import os
import shutil
import struct

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from clipjax.evals import classification_data as classification
from clipjax.data.images import decode_image
from clipjax.data import tfds_util

COLORS = np.array([(220, 30, 30), (30, 30, 220), (30, 200, 30)], np.uint8)
NAMES = ["red_thing", "blue_thing", "green_thing"]
NUM = {"train": 10, "test": 7}
_SKIP_STATS = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)


def _image(index: int, label: int, size: int = 24) -> np.ndarray:
    """A solid class colour with the example's index written into the top-left pixel."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = COLORS[label]
    image[0, 0] = index
    return image


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class _TinyBase(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Test data."}
    code_path = tfds_util.code_path_property(__file__)

    def __init__(self, **kwargs):
        super().__init__(file_format="array_record", **kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split, n) for split, n in NUM.items()}

    def _generate_examples(self, split, num):
        for i in range(num):
            index = i + (100 if split == "test" else 0)
            yield index, {"image": self._encode(_image(index, i % 3)), "label": i % 3}


class TinyClasses(_TinyBase):
    """Image feature: PNG bytes."""

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(24, 24, 3)),
                    "label": tfds.features.ClassLabel(names=NAMES),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _encode(self, image):
        return _png(image)


class TinyTensorClasses(_TinyBase):
    """Tensor feature: raw uint8 pixels."""

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(24, 24, 3), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=NAMES),
                }
            ),
        )

    def _encode(self, image):
        return image


def _masked_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _as_tfrecord_dataset(src_dir: str, dst_dir: str) -> None:
    """Copies a prepared array_record dataset as the TFRecord dataset tfds would have written."""
    shutil.copytree(src_dir, dst_dir)
    builder = tfds.builder_from_directory(src_dir)
    for split in NUM:
        source = builder.as_data_source(
            split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
        )
        for old in [f for f in os.listdir(dst_dir) if f"-{split}.array_record-" in f]:
            os.remove(os.path.join(dst_dir, old))
            with open(os.path.join(dst_dir, old.replace(".array_record-", ".tfrecord-")), "wb") as f:
                for i in range(len(source)):
                    record = source[i]
                    length = struct.pack("<Q", len(record))
                    f.write(length + struct.pack("<I", _masked_crc32c(length)))
                    f.write(record + struct.pack("<I", _masked_crc32c(record)))
    info_path = os.path.join(dst_dir, "dataset_info.json")
    with open(info_path) as f:
        info = json.load(f)
    info["fileFormat"] = "tfrecord"
    with open(info_path, "w") as f:
        json.dump(info, f)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("classification")
    for cls in (TinyClasses, TinyTensorClasses):
        cls(data_dir=str(root / "arrays")).download_and_prepare(download_config=_SKIP_STATS)
    _as_tfrecord_dataset(
        str(root / "arrays" / "tiny_classes" / "1.0.0"), str(root / "tfrecords" / "tiny_classes" / "1.0.0")
    )
    return root


def _check_split(data, split):
    """Every example of the split once, with the label its pixels were drawn for."""
    assert data["image"].dtype == np.uint8 and data["label"].dtype == np.int32
    assert data["image"].shape == (NUM[split], 24, 24, 3)
    offset = 100 if split == "test" else 0
    indices = data["image"][:, 0, 0, 0].astype(int)
    assert sorted(indices) == list(range(offset, offset + NUM[split]))
    for image, label, index in zip(data["image"], data["label"], indices):
        assert label == (index - offset) % 3
        np.testing.assert_array_equal(image, _image(index, label))


@pytest.mark.parametrize("name", ["tiny_classes", "tiny_tensor_classes", "tiny_classes:1.0.0"])
def test_load_split_exact_size(data_dir, name):
    for split in NUM:
        _check_split(
            classification.load_classification_split(name, str(data_dir / "arrays"), split, image_size=24),
            split,
        )


def test_image_and_tensor_datasets_agree_when_resized(data_dir):
    image = classification.load_classification_split(
        "tiny_classes", str(data_dir / "arrays"), "train", 16, num_threads=2
    )
    tensor = classification.load_classification_split(
        "tiny_tensor_classes", str(data_dir / "arrays"), "train", 16
    )
    full = classification.load_classification_split("tiny_classes", str(data_dir / "arrays"), "train", 24)
    assert image["image"].shape == (NUM["train"], 16, 16, 3)
    for data in (image, tensor):
        # Same records in the same order (tfds orders by key), each resized from the original.
        np.testing.assert_array_equal(data["label"], full["label"])
        for small, original in zip(data["image"], full["image"]):
            expected = np.asarray(Image.fromarray(original).resize((16, 16), Image.BILINEAR))
            np.testing.assert_array_equal(small, expected)


def test_tfrecord_dataset_reads_like_array_record(data_dir):
    arrays, tfrecords = str(data_dir / "arrays"), str(data_dir / "tfrecords")
    for split in NUM:
        a = classification.load_classification_split("tiny_classes", arrays, split, 24)
        t = classification.load_classification_split("tiny_classes", tfrecords, split, 24)
        np.testing.assert_array_equal(t["image"], a["image"])
        np.testing.assert_array_equal(t["label"], a["label"])
    # A split slice, then max_examples of it.
    full = classification.load_classification_split("tiny_classes", arrays, "train", 24)
    part = classification.load_classification_split(
        "tiny_classes", tfrecords, "train[2:6]", 24, max_examples=3
    )
    np.testing.assert_array_equal(part["image"], full["image"][2:5])
    # Raw records from a start (a process's share): the same bytes from either format.
    raw = {
        d: classification.RawRecords(classification.get_builder("tiny_classes", d), "train")
        for d in (arrays, tfrecords)
    }
    everything = [r for chunk in raw[arrays].chunks(NUM["train"]) for r in chunk]
    for start, stop in ((0, NUM["train"]), (3, 7), (5, 5), (NUM["train"] - 1, NUM["train"])):
        for d in (arrays, tfrecords):
            chunks = list(raw[d].chunks(stop, 2, start=start))
            assert [r for chunk in chunks for r in chunk] == everything[start:stop], (d, start, stop)
            assert all(0 < len(chunk) <= 2 for chunk in chunks)


def test_slices_and_max_examples(data_dir):
    d = str(data_dir / "arrays")
    full = classification.load_classification_split("tiny_classes", d, "train", 24)
    first = classification.load_classification_split("tiny_classes", d, "train", 24, max_examples=4)
    np.testing.assert_array_equal(first["image"], full["image"][:4])
    sliced = classification.load_classification_split("tiny_classes", d, "train[5:]", 24)
    np.testing.assert_array_equal(sliced["label"], full["label"][5:])
    with pytest.raises(ValueError, match="no split 'validation'"):
        classification.load_classification_split("tiny_classes", d, "validation", 24)


def test_class_names_and_zero_shot_task(data_dir):
    d = str(data_dir / "arrays")
    assert classification.class_names("tiny_classes", d) == ["red thing", "blue thing", "green thing"]
    assert classification.raw_class_names("tiny_tensor_classes", d) == NAMES
    names, templates = classification.zero_shot_task("tiny_classes", str(data_dir / "tfrecords"))
    assert names == ["red thing", "blue thing", "green thing"]
    assert templates and all(t.count("{}") == 1 for t in templates)
    assert templates[0].format(names[0]) == "a photo of a red thing."


def test_missing_dataset_is_one_clear_line(data_dir, tmp_path):
    for name, d in [("no_such_dataset", str(data_dir / "arrays")), ("tiny_classes", str(tmp_path / "empty"))]:
        with pytest.raises(FileNotFoundError) as info:
            classification.load_classification_split(name, d, "test", 24)
        message = str(info.value)
        assert "\n" not in message and repr(name) in message and repr(d) in message


def test_decoding_resizes_shorter_side_and_crops(tmp_path):
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(wide).resize((27, 16), Image.BILINEAR))[:, 5:21]
    # Only the kept square is resampled (same filter weights up to float rounding): within 1.
    np.testing.assert_allclose(decode_image(_png(wide), 16, Image.BILINEAR), expected, atol=1)
    np.testing.assert_allclose(classification.array_image(wide, 16), expected, atol=1)
    grey = rng.integers(0, 256, size=(16, 16), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="JPEG", quality=95)
    rgb = decode_image(buffer.getvalue(), 16, Image.BILINEAR)
    assert rgb.shape == (16, 16, 3)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    np.testing.assert_array_equal(
        classification.array_image(grey[..., None], 16), np.repeat(grey[..., None], 3, axis=-1)
    )
