"""`data.name = 'shapes'`: the embedded procedural dataset, rendered on first use (no download)."""

from __future__ import annotations

from clipjax.data import shapes, shapes_tfds
from clipjax.data.sources.base import register_source
from clipjax.data.sources.tfds_records import TfdsRecordSource
from clipjax.schema import Field


@register_source
class ShapesSource(TfdsRecordSource):
    name = "shapes"
    FIELDS = {
        "num_test": Field(5_000, "held-out images rendered", minimum=1),
        "shapes_seed": Field(0, "the seed the dataset is rendered from"),
    }
    encoded_images = False
    eval_int_fields = shapes.ATTRIBUTE_NAMES

    def make_builder(self):
        return shapes_tfds.prepare_shapes(
            self.data_dir,
            image_size=self.config.image_size,
            num_train=self.config.num_train,
            num_test=self.config.num_test,
            seed=self.config.shapes_seed,
        )

    def zero_shot_tasks(self):
        return shapes.zero_shot_tasks()
