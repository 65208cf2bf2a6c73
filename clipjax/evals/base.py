"""The Evaluator interface, the registry of evaluator kinds, and the data they share.

An evaluator is configured by a named section of `config.evals` (`kind` picks the class,
`enabled` switches it, the rest are the class's `FIELDS`), built once per run, and called with
the model's `Encoders` at each evaluation: `run(encoders) -> dict` of report entries, merged
into report.json (big_vision's evaluator interface). Several sections may share a kind
(two classification datasets, say).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import inspect
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import numpy as np

from clipjax.data.process_state import process_rows
from clipjax.evals.embed import Share, gather_objects, gather_rows
from clipjax.evals.encoders import Encoders
from clipjax.schema import ConfigError, Field, Section


class FrozenFeatures(NamedTuple):
    """Image features and labels for probes fitted on a frozen encoder."""

    train: np.ndarray
    train_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(max(self.train_labels.max(), self.test_labels.max())) + 1


class EvalData:
    """What evaluators read from the training data source, loaded once per run and shared.

    Each process reads and decodes only its contiguous share of the examples (`heldout_local`:
    the images stay there, embedded where they are read), and the small fields of every share
    are gathered in process order (`heldout_fields`), which is the examples' order. `heldout`,
    the whole set with its images on every process, is for an evaluator that needs the pixels
    themselves; the evaluators here never load it.
    """

    def __init__(self, source, tokenizer, *, max_examples: int):
        self.source, self.tokenizer, self.max_examples = source, tokenizer, max_examples
        self._train: dict[int, dict[str, np.ndarray]] = {}

    def _read(self, split: str, max_examples: int, *, local: bool) -> dict[str, np.ndarray]:
        index, count = (jax.process_index(), jax.process_count()) if local else (0, 1)
        read = functools.partial(
            self.source.eval_arrays, self.tokenizer, split=split, max_examples=max_examples
        )
        if count == 1:
            return read()
        if "process" in inspect.signature(self.source.eval_arrays).parameters:
            return read(process=(index, count))
        everything = read()  # a source that cannot read a share: all of it, then this share
        rows = process_rows(len(everything["image"]), index, count)
        return {k: v[rows.start : rows.stop] for k, v in everything.items()}

    @functools.cached_property
    def heldout(self) -> dict[str, np.ndarray]:
        """All the first `evals.max_examples` of the test split (image, text, text_id, label,
        caption, ...), read whole by every process."""
        if jax.process_count() == 1:
            return self.heldout_local
        return self._read("test", self.max_examples, local=False)

    @functools.cached_property
    def heldout_local(self) -> dict[str, np.ndarray]:
        """This process's contiguous share of the held-out examples, images included."""
        return self._read("test", self.max_examples, local=True)

    @functools.cached_property
    def heldout_fields(self) -> dict[str, np.ndarray]:
        """Every field but the image of all the held-out examples, in order (each process's
        share gathered)."""
        return _gathered_fields(self.heldout_local)

    @property
    def num_heldout(self) -> int:
        return len(self.heldout_fields["text_id"])

    def heldout_share(self) -> Share:
        """Where this process's share sits among the held-out examples, and the longest share."""
        return self._heldout_share

    @functools.cached_property
    def _heldout_share(self) -> Share:  # a collective: asked once
        return _share_of(len(self.heldout_local["image"]))

    def train_examples(self, n: int) -> dict[str, np.ndarray]:
        """This process's share of the first n examples of the train split (probes)."""
        if n not in self._train:
            self._train[n] = self._read("train", n, local=True)
        return self._train[n]

    def local_heldout_image_embeddings(self, encoders: Encoders) -> np.ndarray:
        """Image embeddings of this process's share of the held-out examples, computed once per
        `encoders` (image-image models, which have no text tower, have these alone)."""
        length = self.heldout_share().length
        return encoders.memo(
            "heldout_image", lambda: encoders.local_image(self.heldout_local["image"], length)
        )

    def heldout_image_embeddings(self, encoders: Encoders) -> np.ndarray:
        """Image embeddings of all the held-out examples: each process's share, gathered."""
        return encoders.memo(
            "heldout_image_all", lambda: gather_rows(self.local_heldout_image_embeddings(encoders))
        )

    def heldout_embeddings(self, encoders: Encoders) -> tuple[np.ndarray, np.ndarray]:
        """(image, text) embeddings of all the held-out examples, computed once per `encoders`."""
        text = encoders.memo("heldout_text", lambda: encoders.tokens(self.heldout_fields["text"]))
        return self.heldout_image_embeddings(encoders), text

    def frozen_features(
        self, encoders: Encoders, train_examples: int, field: str = "label"
    ) -> FrozenFeatures:
        """Features for probes on the frozen image encoder, the held-out examples as the test
        set, labelled by `field` (`label`, or an attribute the source records: `shape`, a
        nuisance factor, ...). Raises SkipEvaluation when the held-out examples have no labels."""
        heldout = self.heldout_fields
        if field not in heldout:
            raise SkipEvaluation(
                f"the held-out examples of data.name={self.source.config.name!r} have no {field!r}"
            )
        test_labels = heldout[field]
        if not len(test_labels):
            raise SkipEvaluation("there are no held-out examples")
        if np.any(test_labels < 0):
            raise SkipEvaluation(
                f"the held-out examples of data.name={self.source.config.name!r} have no class labels"
            )
        # A probe is fitted on all the train features: each process encodes its share of the
        # train examples, and the features and labels (small next to the images) are gathered.
        train = self.train_examples(train_examples)

        def train_features():
            local = encoders.local_image(train["image"], _share_of(len(train["image"])).length)
            return gather_rows(local)

        train_emb = encoders.memo(("train", train_examples), train_features)
        return FrozenFeatures(
            train_emb, gather_rows(train[field]), self.heldout_image_embeddings(encoders), test_labels
        )


def _share_of(local_rows: int) -> Share:
    """This process's place among rows that each process holds `local_rows` of, in process order."""
    counts = gather_objects(local_rows)
    start = sum(counts[: jax.process_index()])
    return Share(slice(start, start + local_rows), max(counts))


def _gathered_fields(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every field but the image, each process's rows gathered in process order; strings (the
    captions) as JSON, the numbers as arrays."""
    fields = {k: v for k, v in local.items() if k != "image"}
    if jax.process_count() == 1:
        return fields
    strings = [k for k, v in fields.items() if v.dtype.kind in "USO"]
    out = {k: gather_rows(v) for k, v in fields.items() if k not in strings}
    parts = gather_objects({k: fields[k].tolist() for k in strings})
    for k in strings:
        out[k] = np.array([x for part in parts for x in part[k]], dtype=str)
    return out


class SkipEvaluation(Exception):
    """Raised by `Evaluator.run` when it cannot evaluate this model or data; the message says
    why in one line, and the runner names the evaluator and the reason in the log and the report."""


class Evaluator(abc.ABC):
    """Subclasses set `kind`, declare their settings in `FIELDS`, and implement `run`.

    `log(line)` prints progress (the runner's log; silent by default)."""

    kind: ClassVar[str] = ""
    FIELDS: ClassVar[dict[str, Field]] = {}

    def __init__(self, name: str, settings: dict[str, Any], data: EvalData, config: Any, log=None):
        self.name, self.settings, self.data, self.config = name, settings, data, config
        self.log = log or (lambda line: None)

    @classmethod
    def check(cls, settings: dict[str, Any], config: Any, path: str) -> None:
        """Raise ConfigError for settings that cannot work (runs before anything compiles)."""

    @abc.abstractmethod
    def run(self, encoders: Encoders) -> dict[str, Any]:
        """Report entries for the model behind `encoders` (merged into report.json)."""

    def per_field(self, encoders: Encoders, top1: Callable[[FrozenFeatures], float]) -> dict[str, float]:
        """`top1` of the frozen features labelled by each of `settings['fields']` (see
        `label_fields`), by field name: what a probe reports as `fields.<name>`."""
        train_examples = self.settings["train_examples"]
        return {
            field: top1(self.data.frozen_features(encoders, train_examples, field))
            for field in self.settings["fields"]
        }


def label_fields(what: str) -> Field:
    """The `fields` setting of a probe on frozen features: more label fields, each its own probe."""
    return Field(
        (),
        f"more label fields {what}, each on its own (`('shape', 'light')`): report `fields.<name>`",
        type=tuple,
    )


EVALUATORS: dict[str, type[Evaluator]] = {}


def register_evaluator(cls: type[Evaluator]) -> type[Evaluator]:
    """Class decorator: make `cls` usable as `kind` of a `config.evals` section."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no `kind`")
    EVALUATORS[cls.kind] = cls
    return cls


def instance_section(kind: str, *, enabled: bool = True, defaults: dict[str, Any] | None = None) -> Section:
    """The declaration of one `config.evals.<name>` section of this kind; `defaults` replaces
    some of the kind's default settings (a benchmark section's dataset and split, say)."""
    cls = EVALUATORS[kind]
    fields = {
        "kind": Field(kind, "the evaluator class", choices=tuple(EVALUATORS)),
        "enabled": Field(enabled, "run it"),
        "every": Field(0, "during training, run it every N steps (0: every evals.every steps)", minimum=0),
        **cls.FIELDS,
    }
    for key, value in (defaults or {}).items():
        fields[key] = dataclasses.replace(fields[key], default=value)
    return Section(fields, doc=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "")


def read_instance(name: str, values: Any, path: str) -> dict[str, Any]:
    """Check a user-named `config.evals.<name>` section against its kind's declaration."""
    kind = values.get("kind", name) if hasattr(values, "get") else name
    if kind not in EVALUATORS:
        raise ConfigError(f"{path}.kind: unknown evaluator {kind!r} (known: {', '.join(sorted(EVALUATORS))})")
    return instance_section(kind).read(values, path)
