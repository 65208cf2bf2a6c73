"""Data sources: each file is one dataset plug-in, selected by `data.name`.

A source turns `config.data` into train batches (a resumable iterator), held-out arrays,
captions for the tokenizer, and zero-shot tasks (`base.DataSource`), all through the one decoder
(`clipjax.data.decode`). Adding one is a new file (or a package holding all of its code) with a
`@register_source` class and one import line below.
"""

from clipjax.data.sources.base import (
    SOURCES,
    DataSource,
    data_section,
    make_source,
    register_source,
    source_class,
)

# Built-in sources: one line each (importing a module registers its source).
from clipjax.data.sources import shapes as _shapes  # noqa: E402,F401
from clipjax.data.sources import image_text_folder as _image_text_folder  # noqa: E402,F401
from clipjax.data.sources import tfds_dataset as _tfds_dataset  # noqa: E402,F401
from clipjax.data.sources import webdataset as _webdataset  # noqa: E402,F401

__all__ = ["SOURCES", "DataSource", "data_section", "make_source", "register_source", "source_class"]
