"""tensorflow-datasets builder `shapes` over `procedural` (no download).

Works without TensorFlow: features are numpy-typed and the files are ArrayRecord,
read back with `tfds.data_source` / `builder.as_data_source`.

The config name encodes every generation parameter, e.g.
`s32_train50000_test5000_seed0`, so datasets of different sizes live in
different directories under one data_dir. The options away from their defaults
add a suffix: `_nuis` (nuisance factors, stored as int32 features light,
gradient, texture, noise, vignette), `_k32` (32 concepts) and `_box` (each object's
bounding box, a float32 [4] feature `box`), in that order, e.g.
`s32_train50000_test5000_seed0_nuis_k32_box`. Any such name is accepted, also by
`tfds.data_source('shapes/s32_train1000_test100_seed3', data_dir=...)`.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow_datasets as tfds

from clipjax import paths
from clipjax.data.sources.shapes import procedural as shapes
from clipjax.data import tfds_util

_NAME = re.compile(r"^s(\d+)_train(\d+)_test(\d+)_seed(\d+)(_nuis)?(?:_k(\d+))?(_box)?$")


def _canonical_concepts(concepts: int) -> int:
    # All 320 concepts draw exactly the data of the default, so they share its name.
    concepts = shapes.check_concepts(concepts)
    return 0 if concepts == shapes.NUM_CONCEPTS else concepts


def config_name(
    image_size: int,
    num_train: int,
    num_test: int,
    seed: int,
    nuisance: bool = False,
    concepts: int = 0,
    boxes: bool = False,
) -> str:
    name = f"s{image_size}_train{num_train}_test{num_test}_seed{seed}"
    if nuisance:
        name += "_nuis"
    if concepts := _canonical_concepts(concepts):
        name += f"_k{concepts}"
    if boxes:
        name += "_box"
    return name


DEFAULT_NUM_TRAIN = 50_000  # rendered when data.num_train is 0


@dataclasses.dataclass(eq=False, kw_only=True)
class ShapesConfig(tfds.core.BuilderConfig):
    image_size: int = 32
    num_train: int = DEFAULT_NUM_TRAIN
    num_test: int = 5_000
    seed: int = 0
    nuisance: bool = False
    concepts: int = 0  # 0: all 320
    boxes: bool = False

    def __reduce__(self):
        # Unpickle (e.g. in grain worker processes) to the one cached instance per
        # name, which is what tfds insists on for known config names.
        return make_config, (
            self.image_size,
            self.num_train,
            self.num_test,
            self.seed,
            self.nuisance,
            self.concepts,
            self.boxes,
        )


_CONFIGS: dict[str, ShapesConfig] = {}


def make_config(
    image_size: int = 32,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_test: int = 5_000,
    seed: int = 0,
    nuisance: bool = False,
    concepts: int = 0,
    boxes: bool = False,
) -> ShapesConfig:
    """One config object per name (tfds rejects two distinct objects with one name)."""
    nuisance, concepts, boxes = bool(nuisance), _canonical_concepts(concepts), bool(boxes)
    name = config_name(image_size, num_train, num_test, seed, nuisance, concepts, boxes)
    if name not in _CONFIGS:
        description = f"{num_train} train / {num_test} test images of {image_size}px, seed {seed}"
        if nuisance:
            description += ", nuisance factors"
        if concepts:
            description += f", {concepts} concepts"
        if boxes:
            description += ", object boxes"
        _CONFIGS[name] = ShapesConfig(
            name=name,
            image_size=image_size,
            num_train=num_train,
            num_test=num_test,
            seed=seed,
            nuisance=nuisance,
            concepts=concepts,
            boxes=boxes,
            description=description,
        )
    return _CONFIGS[name]


def test_seed(seed: int) -> int:
    # Disjoint generator stream from the train split.
    return seed + 1_000_003


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Procedural shapes with captions; see clipjax/data/sources/shapes/procedural.py."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [make_config()]

    def __init__(self, *, file_format: str | None = "array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    code_path = tfds_util.code_path_property(__file__)

    @classmethod
    def get_builder_config(cls, name, version=None):
        config = super().get_builder_config(name, version)
        if config is None and (m := _NAME.match(name)):
            size, train, test, seed, nuis, k, box = m.groups()
            try:
                config = make_config(
                    int(size), int(train), int(test), int(seed), bool(nuis), int(k or 0), bool(box)
                )
            except ValueError:
                return None  # e.g. more concepts than there are
            if config.name != name:
                return None  # a non-canonical spelling, e.g. _k320 or _k007
        return config

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        s = c.image_size
        int32 = lambda: tfds.features.Tensor(shape=(), dtype=np.int32)
        features = {
            # Raw bytes: tf.Example would otherwise store each uint8 as int64.
            "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8, encoding="bytes"),
            "caption": tfds.features.Text(),
            "text_id": int32(),
            "index": int32(),
            "label": int32(),
            "shape": int32(),
            "color": int32(),
            "size": int32(),
            "position": int32(),
        }
        if c.nuisance:
            features.update({k: int32() for k in shapes.NUISANCE_NAMES})
        if c.boxes:
            features["box"] = tfds.features.Tensor(shape=(4,), dtype=np.float32)
        return tfds.core.DatasetInfo(
            builder=self,
            description="One coloured shape on a noisy gray background, captioned.",
            features=tfds.features.FeaturesDict(features),
            # Record i of a split is example i of generate_split.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        return {
            "train": self._generate_examples(c.num_train, c.seed),
            "test": self._generate_examples(c.num_test, test_seed(c.seed)),
        }

    def _generate_examples(self, num: int, seed: int):
        c = self.builder_config
        data = shapes.generate_split(
            num, seed, c.image_size, nuisance=c.nuisance, concepts=c.concepts, boxes=c.boxes
        )
        keys = [k for k in data if k != "caption"]
        for i in range(num):
            example = {k: data[k][i] for k in keys}
            example["caption"] = data["caption"][i]
            yield i, example


def shapes_builder(
    data_dir: str,
    image_size: int = 32,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_test: int = 5_000,
    seed: int = 0,
    *,
    nuisance: bool = False,
    concepts: int = 0,
    boxes: bool = False,
) -> Shapes:
    config = make_config(image_size, num_train, num_test, seed, nuisance, concepts, boxes)
    return Shapes(data_dir=data_dir, config=config)


def prepare_shapes(
    data_dir: str,
    image_size: int = 32,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_test: int = 5_000,
    seed: int = 0,
    *,
    nuisance: bool = False,
    concepts: int = 0,
    boxes: bool = False,
) -> Shapes:
    """Returns the `shapes` builder for these parameters, prepared if needed; `data_dir` may be a
    bucket URL (`tfds_util.prepare_in_bucket`)."""
    options = dict(nuisance=nuisance, concepts=concepts, boxes=boxes)
    if paths.is_remote(data_dir):
        return tfds_util.prepare_in_bucket(
            lambda local: shapes_builder(local, image_size, num_train, num_test, seed, **options), data_dir
        )
    data_dir = paths.resolve(data_dir)
    return tfds_util.prepare_once(
        lambda: shapes_builder(data_dir, image_size, num_train, num_test, seed, **options), data_dir
    )
