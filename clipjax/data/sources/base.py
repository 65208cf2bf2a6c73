"""The DataSource interface, the registry by `data.name`, and the `data.*` fields all share."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

from absl import logging

from clipjax import paths
from clipjax.data import tokenizers
from clipjax.data.images import check_crop_scale
from clipjax.schema import ConfigError, Field, Section, merge_kinds


def _check_seq_lens(lengths) -> str | None:
    counts = all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in lengths)
    return None if counts and len(set(lengths)) == len(lengths) else "expected distinct positive patch counts"


# `data.*` fields every source reads; a source declares its own in `FIELDS`.
COMMON_FIELDS: dict[str, Field] = {
    "name": Field("shapes", "the data source (`clipjax.data.sources`)"),
    "data_dir": Field(
        "data/tfds",
        "where prepared datasets and trained tokenizers live",
        check=lambda v: None if v.strip() else "must name a directory",
    ),
    "batch_size": Field(256, "the global batch", minimum=1),
    "image_size": Field(32, "images are resized (shorter side) and centre-cropped to this", minimum=1),
    "random_resized_crop": Field(
        (),
        "training crops: () the centre crop; (low, high) a random region of that share of the area "
        "(aspect 3/4..4/3) resized to image_size, e.g. (0.9, 1.0) CLIP-style, (0.08, 1.0) SimCLR-style; "
        "evaluation always centre-crops",
        check=check_crop_scale,
    ),
    "naflex_seq_lens": Field(
        (),
        "a NaFlex model's training sequence lengths (model.image.naflex): each batch one of them, "
        "drawn uniformly per step, its images resized at about their aspect ratio to at most that "
        "many patches; (): (model.image.max_num_patches,). Evaluation embeds image_size squares",
        check=_check_seq_lens,
    ),
    "num_train": Field(
        0,
        "training examples, which `epochs` counts: 0 takes the dataset's own count (tfds, "
        "image_text_folder, webdataset shards with img2dataset's stats files); a value that "
        "contradicts it is refused; shapes renders this many (0: 50,000)",
        minimum=0,
    ),
    "allow_repeats_in_batch": Field(
        False,
        "train on a dataset smaller than one global batch, each batch then holding every example "
        "several times (each copy a false negative of the others): off, such a run is refused",
    ),
    "shuffle_seed": Field(0, "mixed with `seed` into the data order"),
    "worker_count": Field(
        -1,
        "grain worker processes decoding batches (-1: one per CPU core available, if there are "
        "images to decode or crop; 0: in this process's threads)",
        minimum=-1,
    ),
    "read_threads": Field(1, "prefetch threads reading and decoding", minimum=1),
    "prefetch": Field(4, "batches buffered ahead", minimum=1),
    "max_bad_fraction": Field(
        0.01, "stop when more than this share of records cannot be decoded", type=float, minimum=0.0
    ),
}


class DataSource(abc.ABC):
    """One dataset of image-text pairs, as clipjax trains and evaluates on it.

    Constructed from the complete `config.data` section (defaults filled by the schema). A
    subclass sets `name` (its `data.name`), declares the `data.*` fields only it reads in
    `FIELDS`, and implements the methods below; `register_source` makes it selectable.
    """

    name: ClassVar[str] = ""
    FIELDS: ClassVar[dict[str, Field]] = {}
    # Whether `train_iterator` takes `naflex` (clipjax.data.naflex.NaflexInputs): a NaFlex
    # model's batches of patch sequences, which the trainer asks for with that keyword.
    supports_naflex: ClassVar[bool] = False

    def __init__(self, data_config: Any):
        self.config = data_config

    @classmethod
    def check_config(cls, data_config: Any) -> None:
        """Raise ConfigError (one line naming the key) for settings that cannot work here.

        Runs in `clipjax.config.validate`, before anything is prepared or compiled.
        """

    @classmethod
    def gives_boxes(cls, data_config: Any) -> bool:
        """Whether examples come with an object box (`box`: LocCa's localisation tasks)."""
        return False

    @property
    def data_dir(self) -> str:
        """Absolute, or a bucket URL (gs://, s3://) as given: never a local folder named 'gs:'."""
        return paths.resolve(self.config.data_dir)

    def prepare(self) -> None:
        """One-time work before reading (rendering, converting); safe under concurrent processes."""

    def count_train_examples(self) -> int | None:
        """How many training examples the prepared dataset holds, where it says (None: unknown)."""
        return None

    def settle_num_train(self, run_count: int | None = None) -> int:
        """`data.num_train` checked against the dataset (after `prepare`): the dataset's count
        where it is known and num_train is 0 or equal to it. Raises ConfigError (one line naming
        the key and both values) for a contradicting value, for an unknown count left at 0, and
        for a dataset smaller than one global batch (unless data.allow_repeats_in_batch).

        `run_count`: the count a resumed run took from its data (its num_train was 0), kept even
        if the data has grown since (the steps of `epochs` and the loss state were sized by it)."""
        given, known = int(self.config.num_train), self.count_train_examples()
        if run_count:
            if known is not None and known != run_count:
                logging.warning(
                    "the data.name=%r dataset now holds %d training examples; the resumed run keeps "
                    "its data.num_train=%d",
                    self.name,
                    known,
                    run_count,
                )
            given = known = run_count
        if known is not None and given not in (0, known):
            raise ConfigError(
                f"data.num_train: {given} contradicts the {known} training examples of the "
                f"data.name={self.name!r} dataset (0 takes the dataset's count)"
            )
        count = known if known is not None else given
        if not count:
            raise ConfigError(
                f"data.num_train: the data.name={self.name!r} dataset does not say how many training "
                "examples it holds; give their number"
            )
        batch = int(self.config.batch_size)
        if count < batch and not getattr(self.config, "allow_repeats_in_batch", False):
            raise ConfigError(
                f"data.batch_size: {batch} is more than the {count} training examples of the dataset: "
                f"each batch would hold every pair about {batch / count:.1f} times, each copy a false "
                "negative of the others (use a smaller batch, or data.allow_repeats_in_batch=True)"
            )
        return count

    @abc.abstractmethod
    def train_iterator(
        self, tokenizer, *, seed: int, process_index: int = 0, process_count: int = 1, start_example: int = 0
    ):
        """An endless `clipjax.data.process_state.TrainIterator` (or any object with `next()`,
        `get_state()`, `set_state()`, `drop_counts`) over this process's slice of each global
        batch, from the `start_example`-th example of the run's stream on. A source with
        `supports_naflex` also takes `naflex` (NaFlex patch batches)."""

    @abc.abstractmethod
    def eval_arrays(
        self, tokenizer, split: str = "test", max_examples: int | None = None, *, process=(0, 1)
    ) -> dict:
        """A split's first `max_examples` examples (0 or None: all) as numpy arrays: image, text,
        text_id, label, caption, and the attribute labels of `zero_shot_tasks()`. `process`
        (index, count): only that process's contiguous share of them
        (`clipjax.data.process_state.process_rows`), so that evaluating on many hosts reads and
        decodes each example once. A source whose `eval_arrays` takes no `process` is read whole
        on every process and sliced."""

    @abc.abstractmethod
    def caption_texts(self) -> list[str]:
        """The training captions, for training a tokenizer on them."""

    def zero_shot_tasks(self) -> dict[str, tuple[list[str], list[str]]]:
        """{attribute: (class names in label order, prompt templates)}; labels in eval_arrays."""
        return {}

    def tokenizer(self):
        """The tokenizer of `data.tokenizer`; a sentencepiece model without `model_file` is
        trained on the captions and the zero-shot prompts, and cached under data_dir."""
        config = self.config.tokenizer
        texts = None
        trains = config.kind == "sentencepiece" and not config.model_file
        if trains and config.get("style", "clipjax") == "siglip":
            # Before reading every caption: a SigLIP-style tokenizer is the published model's.
            raise ConfigError("data.tokenizer.model_file: style='siglip' needs SigLIP's spiece.model")
        if trains:
            texts = self.caption_texts()
            # Evaluation tokenises the prompts too: their words must be in the vocabulary.
            for classes, templates in self.zero_shot_tasks().values():
                texts.extend(t.format(c) for c in classes for t in templates)
        return tokenizers.make_tokenizer(
            config, texts_for_training=texts, cache_dir=paths.join(self.data_dir, "tokenizers")
        )


SOURCES: dict[str, type[DataSource]] = {}


def register_source(cls: type[DataSource]) -> type[DataSource]:
    """Class decorator: make `cls` selectable as `data.name = cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    SOURCES[cls.name] = cls
    return cls


def source_class(name: str) -> type[DataSource]:
    if name not in SOURCES:
        raise ConfigError(f"data.name: unknown data source {name!r} (known: {', '.join(sorted(SOURCES))})")
    return SOURCES[name]


def data_section() -> Section:
    """`config.data`: the common fields, every registered source's fields, the tokenizer."""
    fields = dict(COMMON_FIELDS)
    fields["name"] = Field("shapes", COMMON_FIELDS["name"].doc, choices=tuple(SOURCES))
    fields.update(merge_kinds({name: cls.FIELDS for name, cls in SOURCES.items()}))
    fields["tokenizer"] = tokenizers.SECTION
    return Section(fields, doc="the data source and input pipeline")


def make_source(data_config: Any) -> DataSource:
    """The registered source of `data_config.name`, given the complete section (checked here)."""
    data_section().read(data_config, "data")
    return source_class(data_config.name)(data_config)
