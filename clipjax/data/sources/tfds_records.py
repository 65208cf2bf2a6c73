"""A data source over a tensorflow-datasets builder prepared (as ArrayRecord) in data.data_dir."""

from __future__ import annotations

import abc
import functools
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from clipjax.captions import decode_caption
from clipjax.data import pipeline, records, tfds_util
from clipjax.data.decode import Decoder, RecordReader, load_arrays
from clipjax.data.process_state import process_rows
from clipjax.data.sources.base import DataSource


class TfdsRecordSource(DataSource):
    """Shared by the sources that prepare a tfds builder and read its records back.

    A subclass implements `make_builder()` (prepared when needed, safe under concurrent
    processes) and says whether images are stored encoded (PNG/JPEG) or as raw uint8 pixels.
    """

    encoded_images: ClassVar[bool] = True
    supports_naflex = True
    eval_int_fields: ClassVar[tuple[str, ...]] = ()  # extra per-example labels for evaluation
    split_hint: ClassVar[str] = ""  # appended to the "no such split" error

    @property
    def boxes(self) -> bool:
        """Whether the records hold an object box (the float [4] field `box`)."""
        return False

    @abc.abstractmethod
    def make_builder(self) -> tfds.core.DatasetBuilder:
        """The prepared builder (prepared here if needed, safe under concurrent processes)."""

    @functools.cached_property
    def builder(self) -> tfds.core.DatasetBuilder:
        return self.make_builder()

    def prepare(self) -> None:
        self.builder  # noqa: B018 - preparing is a side effect of building

    def count_train_examples(self) -> int:
        """The records of the prepared train split (a converted folder's: those it kept)."""
        return len(self.records("train"))

    def records(self, split: str):
        """Random-access serialized records of `split` (any tfds split string)."""
        tfds_util.check_split(self.builder, split, self.split_hint)
        return self.builder.as_data_source(
            split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
        )

    def reader(self, split: str, seed: tuple[int, ...] | None = None, extra_int_fields=()):
        """The decoder's reader of `split` (`seed`: training's, for sources that draw per epoch)."""
        return RecordReader(self.records(split), extra_int_fields, boxes=self.boxes)

    def decoder(
        self, split: str, tokenizer, *, seed=None, keep_captions=False, extra_int_fields=()
    ) -> Decoder:
        return Decoder(
            self.reader(split, seed, extra_int_fields),
            self.config.image_size,
            encoded_images=self.encoded_images,
            tokenizer=tokenizer,
            keep_captions=keep_captions,
        )

    def train_iterator(
        self,
        tokenizer,
        *,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        start_example: int = 0,
        naflex=None,
    ):
        return pipeline.make_train_iterator(
            self.decoder("train", tokenizer, seed=(int(seed) % 2**32, int(self.config.shuffle_seed))),
            self.config,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            start_example=start_example,
            naflex=naflex,
        )

    def eval_arrays(
        self, tokenizer, split: str = "test", max_examples: int | None = None, drops=None, *, process=(0, 1)
    ) -> dict:
        """The first `max_examples` records of the split (this process's share), damaged ones
        left out and counted in `drops`."""
        decoder = self.decoder(split, tokenizer, keep_captions=True, extra_int_fields=self.eval_int_fields)
        n = len(decoder.reader) if not max_examples else min(int(max_examples), len(decoder.reader))
        rows = process_rows(n, *process)
        chunks = (np.arange(i, min(i + 1024, rows.stop)) for i in range(rows.start, rows.stop, 1024))
        return load_arrays(decoder, chunks, drops=drops)

    def caption_texts(self) -> list[str]:
        source = self.records("train")
        texts = []
        step = 4096
        for start in range(0, len(source), step):
            raw = source.__getitems__(list(range(start, min(start + step, len(source)))))
            for caption in records.parse(raw, (), ("caption",))["caption"]:
                text = decode_caption(caption)
                if text is not None:
                    texts.append(text)
        return texts
