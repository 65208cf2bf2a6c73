"""`data.name = 'webdataset'`: tar shards as img2dataset writes them, streamed (no preparation).

    --config.data.name=webdataset --config.data.shards='gs://bucket/cc12m/{00000..01242}.tar'

Each shard holds samples `{key}.jpg` (or png, webp, ...) + `{key}.txt` (+ `{key}.json`, `{key}.cls`).
How the shards are split across processes, shuffled, decoded and resumed exactly is in
`streaming` (beside this file). Held-out evaluation reads the first samples of `data.eval_shards`; the
tokenizer is trained on the captions of the first `data.tokenizer_samples` training samples.

Labelled shards are evaluated like labelled CSVs: a `.cls` member, or the `.json` field named by
`data.label_field`, labels each sample (an integer, or one of `data.class_names`); kNN, the
probes and concept-aware retrieval fit those labels, and zero-shot classification runs when
`data.class_names` names the classes (prompts: `data.zero_shot_templates`).
"""

from __future__ import annotations

import functools
import itertools

from absl import logging

from clipjax import paths
from clipjax.captions import decode_caption
from clipjax.data.sources.webdataset import streaming
from clipjax.data.decode import Decoder, chunks_of, load_arrays
from clipjax.data.process_state import process_gather, process_rows
from clipjax.data.sources import classes
from clipjax.data.sources.base import register_source, DataSource
from clipjax.schema import ConfigError, Field


def _check_spec(spec: str) -> str | None:
    try:
        if "{" in spec:
            streaming.expand_braces(spec.strip())
    except ValueError as e:
        return str(e)
    return None


@register_source
class WebDatasetSource(DataSource):
    name = "webdataset"
    supports_naflex = True
    FIELDS = {
        "shards": Field(
            "",
            "webdataset tar shards (img2dataset's output): a brace pattern such as "
            "`gs://bucket/cc12m/{00000..01242}.tar` (local, gs://, s3://), a folder of .tar files, "
            "or a text file listing one shard per line",
            check=_check_spec,
        ),
        "eval_shards": Field(
            "",
            "held-out shards for evaluation, given as data.shards (empty: the first training "
            "samples, with a warning)",
            check=_check_spec,
        ),
        "shuffle_buffer": Field(
            5_000, "samples each process shuffles together (held in memory as encoded bytes)", minimum=1
        ),
        "shard_interleave": Field(
            4, "shards each process reads at once, a sample from each in turn", minimum=1
        ),
        "tokenizer_samples": Field(
            100_000, "training samples whose captions train a sentencepiece tokenizer", minimum=1
        ),
        "label_field": Field(
            "",
            "the `.json` field holding each sample's class label (an integer, or one of "
            "data.class_names; nested as outer/inner); a `.cls` member labels a sample without it",
        ),
        "box_field": Field(
            "",
            "the `.json` field holding each sample's object box [x_min, y_min, x_max, y_max] as "
            "fractions of the image (nested as outer/inner), for a decoder's localisation tasks "
            "(model.decoder.tasks='locca'); a sample without it has none, a malformed one is dropped "
            "(bad_box)",
        ),
        **classes.FIELDS,
    }

    @classmethod
    def gives_boxes(cls, data_config) -> bool:
        return bool(str(getattr(data_config, "box_field", "") or "").strip())

    @classmethod
    def check_config(cls, data_config) -> None:
        classes.check_config(data_config)
        if not str(data_config.shards).strip():
            raise ConfigError(
                "data.shards: must name the training shards (a brace pattern, a folder of .tar files "
                "or a list file)"
            )

    def _setting(self, name: str):
        # Another source may declare a field of the same name with another default: the merged
        # section then leaves it unset (None), and this source's own default applies.
        value = getattr(self.config, name, None)
        return self.FIELDS[name].default if value is None else value

    @functools.cached_property
    def train_shards(self) -> list[str]:
        return self._resolve("shards")

    @functools.cached_property
    def eval_shards(self) -> list[str]:
        if not str(self._setting("eval_shards")).strip():
            return []
        return self._resolve("eval_shards")

    def _resolve(self, key: str) -> list[str]:
        spec = str(self._setting(key))
        try:
            shards = streaming.resolve_shards(spec)
        except (OSError, ValueError) as e:
            raise ConfigError(f"data.{key}: {spec!r} cannot be read ({e})") from None
        if not shards:
            raise ConfigError(f"data.{key}: {spec!r} names no shard")
        return shards

    def prepare(self) -> None:
        # Nothing to convert; a mistyped pattern or bucket should fail now, not at the first batch.
        for key, shards in (("shards", self.train_shards), ("eval_shards", self.eval_shards)):
            for path in {shards[0], shards[-1]} if shards else ():
                if not paths.exists(path):
                    raise ConfigError(f"data.{key}: the shard {path} does not exist")

    def count_train_examples(self) -> int | None:
        """img2dataset's count (`streaming.count_samples`), when every shard has its statistics."""
        return streaming.count_samples(self.train_shards)

    def decoder(self, tokenizer, keep_captions: bool = False) -> Decoder:
        reader = streaming.SampleReader(
            str(self._setting("label_field")).strip(),
            classes.class_names(self.config),
            box_field=str(self._setting("box_field")).strip(),
        )
        return Decoder(reader, self.config.image_size, tokenizer=tokenizer, keep_captions=keep_captions)

    def zero_shot_tasks(self) -> dict[str, tuple[list[str], list[str]]]:
        return classes.label_task(classes.class_names(self.config), self.config.zero_shot_templates)

    def train_iterator(
        self,
        tokenizer,
        *,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        start_example: int = 0,
        num_epochs: int | None = None,
        naflex=None,
    ):
        """See DataSource; `num_epochs` ends the stream after that many epochs (tests, tools)."""
        return streaming.make_train_iterator(
            self.train_shards,
            self.decoder(tokenizer),
            self.config,
            shuffle_buffer=int(self._setting("shuffle_buffer")),
            interleave=int(self._setting("shard_interleave")),
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            start_example=start_example,
            num_epochs=num_epochs,
            # Each process reads its own shards: the checkpoint keeps every process's position.
            gather=process_gather(process_count),
            naflex=naflex,
        )

    def eval_arrays(
        self, tokenizer, split: str = "test", max_examples: int | None = None, drops=None, *, process=(0, 1)
    ) -> dict:
        """The first `max_examples` samples of data.eval_shards ('test') or data.shards ('train'),
        in the order listed (this process's share), damaged ones left out and counted in `drops`:
        the same samples whichever of them decode, and however many processes share them."""
        if split == "train":
            shards = self.train_shards
        elif split == "test":
            shards = self.eval_shards
            if not shards:
                logging.warning(
                    "data.eval_shards is not set: evaluating on the first training samples, which are "
                    "not held out"
                )
                shards = self.train_shards
        else:
            raise ValueError(f"webdataset: no split {split!r} (train: data.shards, test: data.eval_shards)")
        start, stop = 0, int(max_examples) if max_examples else None
        if process[1] > 1:
            # The shares need the count: the samples are read (not decoded) once more for it.
            total = sum(1 for _ in itertools.islice(streaming.read_in_order(shards), stop))
            rows = process_rows(total, *process)
            start, stop = rows.start, rows.stop
        samples = itertools.islice(streaming.read_in_order(shards), start, stop)
        return load_arrays(self.decoder(tokenizer, keep_captions=True), chunks_of(samples, 256), drops=drops)

    def caption_texts(self) -> list[str]:
        texts = []
        samples = streaming.read_in_order(self.train_shards)
        for sample in itertools.islice(samples, int(self._setting("tokenizer_samples"))):
            text = decode_caption(sample.caption)
            if text is not None:
                texts.append(text)
        samples.close()
        return texts
