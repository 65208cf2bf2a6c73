"""`data.name = 'shapes'`: the embedded procedural dataset, rendered on first use (no download)."""

from __future__ import annotations

import numpy as np

from clipjax.data.sources.shapes import procedural as shapes
from clipjax.data.sources.shapes.builder import DEFAULT_NUM_TRAIN, prepare_shapes, test_seed
from clipjax.data.sources.base import register_source
from clipjax.data.sources.tfds_records import TfdsRecordSource
from clipjax.schema import Field


@register_source
class ShapesSource(TfdsRecordSource):
    name = "shapes"
    FIELDS = {
        "num_test": Field(5_000, "held-out images rendered", minimum=1),
        "shapes_seed": Field(0, "the seed the dataset is rendered from"),
        "shapes_nuisance": Field(
            False,
            "draw per-image nuisance factors (light, gradient, texture, noise, vignette; docs/data.md), "
            "each an int32 label in the records and the eval arrays",
        ),
        "shapes_concepts": Field(
            0,
            "draw only this many of the 320 concepts (`shapes.concept_subset`), uniformly; 0: all",
            minimum=0,
            check=lambda v: None if v <= shapes.NUM_CONCEPTS else f"at most {shapes.NUM_CONCEPTS}",
        ),
        "shapes_boxes": Field(
            False,
            "store each object's bounding box in the records (`box`: the tight box of its pixels), "
            "for a decoder's localisation tasks (model.decoder.tasks='locca')",
        ),
    }
    encoded_images = False

    @property
    def boxes(self) -> bool:
        return self.gives_boxes(self.config)

    @classmethod
    def gives_boxes(cls, data_config) -> bool:
        return bool(data_config.shapes_boxes)

    @property
    def eval_int_fields(self) -> tuple[str, ...]:
        # The nuisance labels only exist (as record features) when rendered.
        nuisance = shapes.NUISANCE_NAMES if self.config.shapes_nuisance else ()
        return shapes.ATTRIBUTE_NAMES + nuisance

    def make_builder(self):
        return prepare_shapes(
            self.data_dir,
            image_size=self.config.image_size,
            num_train=self.config.num_train or DEFAULT_NUM_TRAIN,
            num_test=self.config.num_test,
            seed=self.config.shapes_seed,
            nuisance=self.config.shapes_nuisance,
            concepts=self.config.shapes_concepts,
            boxes=self.config.shapes_boxes,
        )

    def zero_shot_tasks(self):
        return shapes.zero_shot_tasks()

    def object_masks(self, split: str, index) -> np.ndarray:
        """bool [n, S, S]: the object's pixels in the records `index` of `split` ('train' or
        'test'), rendered again (the dataset is a pure function of its seed): what the dense
        evaluator labels patches with."""
        c = self.config
        if split == "test":
            num, seed = c.num_test, test_seed(c.shapes_seed)
        else:
            num, seed = c.num_train or DEFAULT_NUM_TRAIN, c.shapes_seed
        data = shapes.generate_split(
            num, seed, c.image_size, nuisance=c.shapes_nuisance, concepts=c.shapes_concepts, masks=True
        )
        return data["mask"][index]

    @staticmethod
    def parse_caption(caption: str) -> dict[str, int]:
        """The attribute labels a caption states (-1 where it does not): how the captioning
        evaluator scores generated captions."""
        return shapes.parse_caption(caption)
