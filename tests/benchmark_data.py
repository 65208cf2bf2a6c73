"""Tiny stand-ins for the published evaluation datasets, written by the tests (nothing downloaded).

`write_classification_like(name, ...)` takes the features, version and config of the real
tensorflow-datasets builder `name` (tfds ships their code, so no data is needed to read them) and
writes a small prepared ArrayRecord dataset with exactly those features under that name, so the
evaluators read it as they would read the real one. Images are solid colours that encode their
label: `label_of(image)` reads it back, which lets a test build an encoder with a known answer.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from clipjax.data import tfds_util

_SKIP_STATS = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)


def label_image(label: int, size: int) -> np.ndarray:
    """A solid image whose red and green channels hold the label (up to 65,535 classes)."""
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = label // 256, label % 256, 77
    return image


def label_of(images: np.ndarray) -> np.ndarray:
    """The labels `label_image` drew into uint8 [N, H, W, 3] images."""
    corner = np.asarray(images)[:, 0, 0].astype(np.int64)
    return corner[:, 0] * 256 + corner[:, 1]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def _value(feature, label: int, size: int):
    """A value of `feature` (one of the kinds these datasets use) for an example of `label`."""
    if isinstance(feature, tfds.features.Image):
        channels = feature.shape[-1] or 3
        image = label_image(label, size) if channels == 3 else np.full((size, size, channels), 1, np.uint8)
        return _png(image)
    if isinstance(feature, tfds.features.ClassLabel):
        return label % feature.num_classes
    if isinstance(feature, tfds.features.Text):
        return f"example of class {label}"
    if isinstance(feature, tfds.features.BBoxFeature):
        return tfds.features.BBox(0.1, 0.2, 0.6, 0.7)
    raise TypeError(f"no test value for {type(feature).__name__}")


def real_builder(name: str, tmp_dir: str) -> tfds.core.DatasetBuilder:
    """tfds's own builder of `name` (its code ships with tfds; nothing is read from tmp_dir)."""
    return tfds.builder(name, data_dir=tmp_dir)


# Class names that tfds reads from the downloaded files (its code declares only a class count).
LABEL_NAMES = {
    "cifar10": "airplane automobile bird cat deer dog frog horse ship truck".split(),
    "stl10": "airplane bird car cat deer dog horse monkey ship truck".split(),
    "cifar100": (
        "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly "
        "camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup "
        "dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower "
        "leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid "
        "otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray "
        "road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar "
        "sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle "
        "wardrobe whale willow_tree wolf woman worm"
    ).split(),
}


def write_classification_like(
    name: str, data_dir: str, splits: dict[str, list[int]], *, image_size: int = 16, scratch: str
) -> str:
    """Writes dataset `name` (features, version and config of tfds's real builder, and the class
    names of the prepared dataset) into data_dir with `splits` = {split: the label of each
    example}; returns the name to evaluate it by."""
    real = real_builder(name, scratch)
    features = real.info.features
    if name in LABEL_NAMES:
        features = tfds.features.FeaturesDict(
            {
                key: tfds.features.ClassLabel(names=LABEL_NAMES[name]) if key == "label" else feature
                for key, feature in features.items()
            }
        )
    config = real.builder_config.name if real.builder_config else None

    class Like(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = real.version
        RELEASE_NOTES = {str(real.version): "test stand-in"}
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config)] if config else []
        code_path = tfds_util.code_path_property(__file__)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(labels) for split, labels in splits.items()}

        def _generate_examples(self, labels):
            for i, label in enumerate(labels):
                yield i, {key: _value(f, int(label), image_size) for key, f in features.items()}

    Like.name = name
    builder = Like(data_dir=data_dir, file_format="array_record", config=config)
    builder.download_and_prepare(download_config=_SKIP_STATS)
    return f"{name}/{config}" if config else name


def coco_like_features() -> tfds.features.FeaturesDict:
    """coco_captions' features (tfds cannot build its own builder without TensorFlow)."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(encoding_format="png"),
            "image/filename": tfds.features.Text(),
            "image/id": np.int64,
            "objects": tfds.features.Sequence(
                {"bbox": tfds.features.BBoxFeature(), "label": tfds.features.ClassLabel(num_classes=80)}
            ),
            "captions": tfds.features.Sequence({"text": tfds.features.Text(), "id": np.int64}),
        }
    )


def write_captions_like(
    data_dir: str,
    splits: dict[str, list[list[str]]],
    *,
    name: str = "coco_captions",
    config: str | None = "2014",
    image_size: int = 16,
    image_of=None,
) -> str:
    """A coco_captions-shaped dataset: {split: the captions of each image}; image i of a split is
    `label_image(image_of(i))` (default: i). Returns the name to evaluate it by."""
    image_of = image_of or (lambda i: i)

    class CaptionsLike(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.1.0")
        RELEASE_NOTES = {"1.1.0": "test stand-in"}
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config)] if config else []
        code_path = tfds_util.code_path_property(__file__)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=coco_like_features())

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(split, captions) for split, captions in splits.items()}

        def _generate_examples(self, split, captions):
            for i, texts in enumerate(captions):
                yield (
                    f"{split}{i}",
                    {
                        "image": _png(label_image(image_of(i), image_size)),
                        "image/filename": f"{split}_{i}.png",
                        "image/id": i,
                        "objects": {"bbox": [tfds.features.BBox(0.1, 0.2, 0.5, 0.6)], "label": [i % 80]},
                        "captions": {"text": texts, "id": list(range(len(texts)))},
                    },
                )

    CaptionsLike.name = name
    CaptionsLike(data_dir=data_dir, file_format="array_record", config=config).download_and_prepare(
        download_config=_SKIP_STATS
    )
    return f"{name}/{config}" if config else name
