"""tensorflow-datasets builder `shapes` over `clipjax.data.shapes` (no download).

Works without TensorFlow: features are numpy-typed and the files are ArrayRecord,
read back with `tfds.data_source` / `builder.as_data_source`.

The config name encodes every generation parameter, e.g.
`s32_train50000_test5000_seed0`, so datasets of different sizes live in
different directories under one data_dir. Any such name is accepted, also by
`tfds.data_source('shapes/s32_train1000_test100_seed3', data_dir=...)`.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow_datasets as tfds

from clipjax import paths
from clipjax.data import shapes
from clipjax.data import tfds_util

_NAME = re.compile(r"^s(\d+)_train(\d+)_test(\d+)_seed(\d+)$")


def config_name(image_size: int, num_train: int, num_test: int, seed: int) -> str:
    return f"s{image_size}_train{num_train}_test{num_test}_seed{seed}"


@dataclasses.dataclass(eq=False, kw_only=True)
class ShapesConfig(tfds.core.BuilderConfig):
    image_size: int = 32
    num_train: int = 50_000
    num_test: int = 5_000
    seed: int = 0

    def __reduce__(self):
        # Unpickle (e.g. in grain worker processes) to the one cached instance per
        # name, which is what tfds insists on for known config names.
        return make_config, (self.image_size, self.num_train, self.num_test, self.seed)


_CONFIGS: dict[str, ShapesConfig] = {}


def make_config(
    image_size: int = 32, num_train: int = 50_000, num_test: int = 5_000, seed: int = 0
) -> ShapesConfig:
    """One config object per name (tfds rejects two distinct objects with one name)."""
    name = config_name(image_size, num_train, num_test, seed)
    if name not in _CONFIGS:
        _CONFIGS[name] = ShapesConfig(
            name=name,
            image_size=image_size,
            num_train=num_train,
            num_test=num_test,
            seed=seed,
            description=f"{num_train} train / {num_test} test images of {image_size}px, seed {seed}",
        )
    return _CONFIGS[name]


def _test_seed(seed: int) -> int:
    # Disjoint generator stream from the train split.
    return seed + 1_000_003


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Procedural shapes with captions; see clipjax/data/shapes.py."""

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
            config = make_config(*(int(g) for g in m.groups()))
        return config

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        int32 = lambda: tfds.features.Tensor(shape=(), dtype=np.int32)
        return tfds.core.DatasetInfo(
            builder=self,
            description="One coloured shape on a noisy gray background, captioned.",
            features=tfds.features.FeaturesDict(
                {
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
            ),
            # Record i of a split is example i of generate_split.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        return {
            "train": self._generate_examples(c.num_train, c.seed),
            "test": self._generate_examples(c.num_test, _test_seed(c.seed)),
        }

    def _generate_examples(self, num: int, seed: int):
        data = shapes.generate_split(num, seed, self.builder_config.image_size)
        keys = [k for k in data if k != "caption"]
        for i in range(num):
            example = {k: data[k][i] for k in keys}
            example["caption"] = data["caption"][i]
            yield i, example


def shapes_builder(
    data_dir: str, image_size: int = 32, num_train: int = 50_000, num_test: int = 5_000, seed: int = 0
) -> Shapes:
    return Shapes(data_dir=data_dir, config=make_config(image_size, num_train, num_test, seed))


def prepare_shapes(
    data_dir: str, image_size: int = 32, num_train: int = 50_000, num_test: int = 5_000, seed: int = 0
) -> Shapes:
    """Returns the `shapes` builder for these parameters, prepared if needed; `data_dir` may be a
    bucket URL (`tfds_util.prepare_in_bucket`)."""
    if paths.is_remote(data_dir):
        return tfds_util.prepare_in_bucket(
            lambda local: shapes_builder(local, image_size, num_train, num_test, seed), data_dir
        )
    data_dir = paths.resolve(data_dir)
    return tfds_util.prepare_once(
        lambda: shapes_builder(data_dir, image_size, num_train, num_test, seed), data_dir
    )
