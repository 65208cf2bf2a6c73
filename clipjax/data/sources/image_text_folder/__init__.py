"""`data.name = 'image_text_folder'`: the user's own images and captions (a CSV or a folder).

Evaluated like the built-in data: an optional `label` column of the CSV (numbers, or class
names), or class subfolders of a folder, label each image; then retrieval is concept-aware (a
caption of the same class counts), kNN and the probes fit those labels, and zero-shot
classification runs when the classes have names (the label column's, or `data.class_names`),
with CLIP's prompt ensemble by default. The test split is `data.eval_source` (a separate CSV or
folder) when given, else a `data.test_fraction` of the files held out by a hash of their path.
"""

from __future__ import annotations

import functools

import tensorflow_datasets as tfds

from clipjax import paths
from clipjax.data.sources.image_text_folder.builder import label_names, prepare_folder
from clipjax.data.sources import classes
from clipjax.data.sources.base import register_source
from clipjax.data.sources.tfds_records import TfdsRecordSource
from clipjax.schema import ConfigError, Field


@register_source
class ImageTextFolderSource(TfdsRecordSource):
    name = "image_text_folder"
    FIELDS = {
        "source": Field(
            "",
            "a CSV with `image,caption` (and optionally `label`) columns, or a folder of images with "
            "same-named .txt captions (in class subfolders for labels)",
        ),
        "test_fraction": Field(
            0.02,
            "share of the files held out as the test split, by a hash of their path (ignored with eval_source)",
            minimum=0.0,
            check=lambda v: None if v < 1 else "expected a fraction below 1",
        ),
        "eval_source": Field("", "a separate CSV or folder as the test split (empty: test_fraction)"),
        **classes.FIELDS,
    }
    encoded_images = True
    split_hint = " (set data.test_fraction > 0 or data.eval_source to have a test split)"

    @classmethod
    def check_config(cls, data_config) -> None:
        classes.check_config(data_config)
        for key in ("source", "eval_source"):
            source = getattr(data_config, key)
            if key == "eval_source" and not source:
                continue
            if not source or not paths.exists(source):
                raise ConfigError(
                    f"data.{key}: {source!r} does not exist (a folder or CSV of images and captions)"
                )
        # data_dir need not exist: it is created when the folder is prepared, as for every source.

    @functools.cached_property
    def label_names(self) -> tuple[str, ...]:
        """The class names that number the labels, over the training and evaluation sources."""
        sources = [self.config.source] + ([self.config.eval_source] if self.config.eval_source else [])
        return label_names(*sources)

    def make_builder(self):
        test_fraction = 0.0 if self.config.eval_source else self.config.test_fraction
        return prepare_folder(
            self.data_dir, self.config.source, test_fraction=test_fraction, label_names=self.label_names
        )

    @functools.cached_property
    def eval_builder(self):
        """The dataset of `data.eval_source`, all of it in its `train` split."""
        return prepare_folder(
            self.data_dir, self.config.eval_source, test_fraction=0.0, label_names=self.label_names
        )

    def prepare(self) -> None:
        super().prepare()
        if self.config.eval_source:
            self.eval_builder  # noqa: B018 - prepared as a side effect

    def records(self, split: str):
        if split == "test" and self.config.eval_source:
            return self.eval_builder.as_data_source(
                split="train", deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
            )
        return super().records(split)

    def zero_shot_tasks(self) -> dict[str, tuple[list[str], list[str]]]:
        names = classes.class_names(self.config) or self.label_names
        return classes.label_task(names, self.config.zero_shot_templates)
