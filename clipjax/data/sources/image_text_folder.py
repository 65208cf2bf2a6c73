"""`data.name = 'image_text_folder'`: the user's own images and captions (a CSV or a folder)."""

from __future__ import annotations

from clipjax import paths
from clipjax.data import folder_tfds
from clipjax.data.sources.base import register_source
from clipjax.data.sources.tfds_records import TfdsRecordSource
from clipjax.schema import ConfigError, Field


@register_source
class ImageTextFolderSource(TfdsRecordSource):
    name = "image_text_folder"
    FIELDS = {
        "source": Field(
            "", "a CSV with `image,caption` columns, or a folder of images with same-named .txt captions"
        ),
        "test_fraction": Field(
            0.02,
            "share of the files held out as the test split",
            minimum=0.0,
            check=lambda v: None if v < 1 else "expected a fraction below 1",
        ),
    }
    encoded_images = True
    split_hint = " (set data.test_fraction > 0 to hold out a test split)"

    @classmethod
    def check_config(cls, data_config) -> None:
        source = data_config.source
        if not source or not paths.exists(source):
            raise ConfigError(
                f"data.source: {source!r} does not exist (a folder or CSV of images and captions)"
            )
        # data_dir need not exist: it is created when the folder is prepared, as for every source.

    def make_builder(self):
        return folder_tfds.prepare_folder(
            self.data_dir, self.config.source, test_fraction=self.config.test_fraction
        )
