"""Classification benchmarks: tensorflow-datasets image-classification datasets by name and split.

Zero-shot top-1/top-5 as CLIP reports it (each class name in every prompt template of the
dataset's published ensemble, `clipjax.prompts`; the prompt embeddings averaged per
class), and the probes on frozen features of the dataset's train split. The evaluation split is
streamed: images are read, decoded and embedded one batch at a time, so host memory holds a
batch of images (plus the embeddings when a probe needs them), never the split.

`BENCHMARKS` is the table of the published benchmarks. Each is a section of `config.evals`,
disabled by default and named after it, so `--config.evals.cifar10.enabled=True` evaluates
CIFAR-10 on its test split. Any other tfds classification dataset with a `label` feature is a
section of kind `classification` with its `dataset` set (the `classification` section is one).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import numpy as np
import tensorflow_datasets as tfds

from clipjax.evals import classification_data as datasets
from clipjax.data.drops import DropCounter
from clipjax import prompts
from clipjax.evals.base import Evaluator, FrozenFeatures, SkipEvaluation, register_evaluator
from clipjax.evals.embed import (
    Share,
    gather_rows,
    process_share,
    sum_counters,
    sum_over_processes,
)
from clipjax.evals.knn import knn_accuracy
from clipjax.evals.linear_probe import linear_probe
from clipjax.evals.zero_shot import class_embeddings, warn_unreadable_class_names
from clipjax.schema import ConfigError, Field


class Benchmark(NamedTuple):
    dataset: str  # tfds name
    split: str  # the split with labels that papers report on
    present_classes_only: bool = False  # score only the classes the split has (ImageNet-A/R)


# Section name -> benchmark. ImageNet's tfds `test` split has no labels: its validation split is
# what papers call the ImageNet test set. ImageNet-A and -R label 200 of the 1000 classes, and
# are scored over those 200, as CLIP's paper does.
BENCHMARKS = {
    "imagenet": Benchmark("imagenet2012", "validation"),
    "imagenet_v2": Benchmark("imagenet_v2", "test"),
    "imagenet_a": Benchmark("imagenet_a", "test", present_classes_only=True),
    "imagenet_r": Benchmark("imagenet_r", "test", present_classes_only=True),
    "imagenet_sketch": Benchmark("imagenet_sketch", "test"),
    "cifar10": Benchmark("cifar10", "test"),
    "cifar100": Benchmark("cifar100", "test"),
    "food101": Benchmark("food101", "validation"),
    "pets": Benchmark("oxford_iiit_pet", "test"),
    "caltech101": Benchmark("caltech101", "test"),
    "stl10": Benchmark("stl10", "test"),
}
_EVAL_SPLITS = {b.dataset: b.split for b in BENCHMARKS.values()}
_PRESENT_ONLY = {b.dataset for b in BENCHMARKS.values() if b.present_classes_only}


def base_name(dataset: str) -> str:
    """The tfds name without config and version: imagenet_v2/matched-frequency:3.0.0 -> imagenet_v2."""
    return dataset.split(":")[0].split("/")[0]


def eval_split(dataset: str, available: list[str]) -> str:
    """The split a dataset is evaluated on when its section names none: the benchmark's, else
    `test`, else `validation`."""
    known = _EVAL_SPLITS.get(base_name(dataset))
    if known:
        return known
    for split in ("test", "validation"):
        if split in available:
            return split
    raise ValueError(f"dataset {dataset} has no test or validation split ({available}); set its split")


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _topk_hits(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Whether each row's label is among its k highest scores, ties going to the lower class
    index as argmax and a stable sort order them (CLIP's ImageNet names repeat two names, and
    its published numbers count the first of each pair)."""
    own = scores[np.arange(len(labels)), labels][:, None]
    lower = np.arange(scores.shape[1])[None, :] < labels[:, None]
    ahead = (scores > own) | ((scores == own) & lower)
    return ahead.sum(axis=1) < k


@register_evaluator
class ClassificationEvaluator(Evaluator):
    """Zero-shot top-1/top-5, probes and kNN on a tfds image-classification dataset, by name and split."""

    kind = "classification"
    FIELDS = {
        "dataset": Field("", "tfds name, e.g. `cifar10` or `imagenet2012:5.1.0`, prepared in data_dir"),
        "data_dir": Field("", "where it is prepared (empty: data.data_dir)"),
        "split": Field("", "split evaluated, any tfds split string (empty: the benchmark's, else test)"),
        "max_examples": Field(0, "examples of the split evaluated (0: all of them)", minimum=0),
        "batch_size": Field(0, "images per encoder call (0: evals.batch_size)", minimum=0),
        "zero_shot": Field(True, "zero-shot top-1/top-5"),
        "class_names": Field("", "comma-separated class names in label order (empty: the dataset's)"),
        "templates": Field(
            "", "prompt ensemble: `imagenet` (80), `cifar` (18), a dataset's, or empty for the dataset's own"
        ),
        "linear_probe": Field(True, "ridge probe on frozen features of train_split"),
        "logistic_probe": Field(False, "logistic-regression probe on frozen features of train_split"),
        "few_shot": Field(False, "1/5/10/25-shot ridge probes on frozen features of train_split"),
        "knn": Field(True, "weighted kNN on frozen features of train_split"),
        "train_split": Field("train", "split the probes and kNN are fitted on"),
        "train_examples": Field(5000, "train examples for the probes and kNN", minimum=1),
        "image_key": Field("image", "the image feature"),
        "label_key": Field("label", "the label feature"),
    }

    @classmethod
    def check(cls, settings, config, path):
        if not settings["dataset"]:
            raise ConfigError(f"{path}.dataset: name a prepared tfds image-classification dataset")
        data_dir = settings["data_dir"] or config.data.data_dir
        try:
            builder = datasets.get_builder(settings["dataset"], data_dir)
            split = settings["split"] or eval_split(settings["dataset"], list(builder.info.splits))
            datasets.split_size(settings["dataset"], data_dir, split)
            if _any_probe(settings):
                datasets.split_size(settings["dataset"], data_dir, settings["train_split"])
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{path}.dataset: {str(e).splitlines()[0]}") from None

    # -- pieces --------------------------------------------------------------------------------

    @property
    def data_dir(self) -> str:
        return self.settings["data_dir"] or self.config.data.data_dir

    def split(self) -> str:
        s = self.settings
        if s["split"]:
            return s["split"]
        builder = datasets.get_builder(s["dataset"], self.data_dir)
        return eval_split(s["dataset"], list(builder.info.splits))

    def zero_shot_task(self) -> tuple[list[str], list[str]]:
        s = self.settings
        raw = datasets.raw_class_names(s["dataset"], self.data_dir, label_key=s["label_key"])
        names, templates = prompts.zero_shot_prompts(s["dataset"], raw)
        if s["class_names"]:
            names = _comma_list(s["class_names"])
            if len(names) != len(raw):
                raise ConfigError(
                    f"evals.{self.name}.class_names: {len(names)} names for the {len(raw)} classes of "
                    f"{s['dataset']}"
                )
        elif all(name.isdigit() for name in names):
            raise SkipEvaluation(
                f"{s['dataset']} names its classes by number; give their names in evals.{self.name}.class_names"
            )
        if s["templates"]:
            templates = prompts.templates(s["templates"])
        return names, templates

    def _share(self, split: str, max_examples: int) -> tuple[str, int, Share]:
        """(what this process reads: a split string, '' for nothing, and its max_examples; and
        its `Share`) of the first `max_examples` (0: all) records of `split`."""
        total = datasets.split_size(self.settings["dataset"], self.data_dir, split)
        share = process_share(min(total, max_examples) if max_examples else total)
        if jax.process_count() == 1:
            return split, max_examples, share
        builder = datasets.get_builder(self.settings["dataset"], self.data_dir)
        return _split_rows(builder, split, share.rows), 0, share

    def _no_images(self) -> dict[str, np.ndarray]:
        size = self.config.data.image_size
        return {"image": np.zeros((0, size, size, 3), np.uint8), "label": np.zeros(0, np.int32)}

    def local_batches(self, split: str, max_examples: int, share: Share, read: int, drops: DropCounter):
        """This process's batches of its share of the records, at most `read` images each; every
        process gets as many (the last ones empty where its share is shorter), so that each
        batch is one encoding in every process."""
        s = self.settings
        batches = iter(())
        if split:
            batches = datasets.classification_batches(
                s["dataset"],
                self.data_dir,
                split,
                self.config.data.image_size,
                batch_size=read,
                max_examples=max_examples,
                image_key=s["image_key"],
                label_key=s["label_key"],
                drops=drops,
                resize=self.config.model.get("image_resize", "crop"),
            )
        for _ in range(-(-share.length // read)):  # a batch holds `read` records or fewer
            yield next(batches, self._no_images())
        next(batches, None)  # none is left: this ends the read (and checks its record count)

    # -- the evaluation ------------------------------------------------------------------------

    def run(self, encoders):
        s = self.settings
        name, split = s["dataset"], self.split()
        if not (s["zero_shot"] or _any_probe(s)):
            raise SkipEvaluation("zero_shot, the probes and knn are all off")
        classes = present = None
        if s["zero_shot"]:
            names, templates = self.zero_shot_task()
            warn_unreadable_class_names(
                getattr(encoders, "tokenizer", None), names, templates, f"evals.{self.name}", self.log
            )
            classes = class_embeddings(encoders.text, names, templates)
            if base_name(name) in _PRESENT_ONLY:
                present = self._present_labels(split)
        # Each process reads, decodes and encodes its share of the split, and scores it: only the
        # counts are summed (and, for the probes, the embeddings gathered).
        batch_size = s["batch_size"] or self.config.evals.batch_size
        read = encoders.local_batch_size(batch_size)
        part, max_examples, share = self._share(split, s["max_examples"])
        total = share.rows.stop - share.rows.start
        drops = DropCounter()
        counts = np.zeros(3, np.int64)  # images, top-1 hits, top-5 hits
        embeddings, labels = [], []
        started = last_report = time.perf_counter()
        for batch in self.local_batches(part, max_examples, share, read, drops):
            emb = encoders.local_image(batch["image"], read, batch_size=batch_size)
            counts[0] += len(emb)
            if _any_probe(s):
                embeddings.append(emb)
                labels.append(batch["label"])
            if classes is not None:
                scores = emb @ classes.T
                label = batch["label"]
                if present is not None:
                    scores = scores[:, present]
                    label = np.searchsorted(present, label)
                counts[1:] += [_topk_hits(scores, label, 1).sum(), _topk_hits(scores, label, 5).sum()]
            now = time.perf_counter()
            seen = int(counts[0])
            if now - last_report > 30 or seen + drops.total >= total:
                last_report = now
                self.log(
                    f"evals.{self.name}: {name} {split} {seen + drops.total}/{total} images, "
                    f"{seen / max(now - started, 1e-9):.0f} images/s"
                )
        seen, hits1, hits5 = (int(c) for c in sum_over_processes(counts))
        result: dict = {"dataset": name, "split": split, "num_examples": seen}
        skipped = sum_counters(drops.counts)
        if sum(skipped.values()):
            result["skipped"] = skipped
        if classes is not None and seen:
            num_classes = len(present) if present is not None else len(classes)
            result["zero_shot"] = {"top1": hits1 / seen, "num_classes": int(num_classes)}
            if num_classes > 5:
                result["zero_shot"]["top5"] = hits5 / seen
        if _any_probe(s) and seen:
            test = gather_rows(np.concatenate(embeddings)), gather_rows(np.concatenate(labels))
            result.update(self._probes(encoders, *test))
        return {"classification": {name: result}}

    def _present_labels(self, split: str) -> np.ndarray:
        """The sorted labels the split has (a pass over the labels only, images undecoded)."""
        s = self.settings
        return np.unique(
            datasets.split_labels(
                s["dataset"], self.data_dir, split, max_examples=s["max_examples"], label_key=s["label_key"]
            )
        )

    def _probes(self, encoders, test_emb: np.ndarray, test_labels: np.ndarray) -> dict:
        """The probes and kNN, fitted on the train split's features: each process encodes its
        share of them, and they are gathered (a probe is fitted on all of them)."""
        s = self.settings
        split, max_examples, share = self._share(s["train_split"], s["train_examples"])
        train = self._no_images()
        if split:
            train = datasets.load_classification_split(
                s["dataset"],
                self.data_dir,
                split,
                self.config.data.image_size,
                max_examples=max_examples,
                image_key=s["image_key"],
                label_key=s["label_key"],
                drops=DropCounter(),
            )
        train_emb = gather_rows(encoders.local_image(train["image"], share.length))
        f = FrozenFeatures(train_emb, gather_rows(train["label"]), test_emb, test_labels)
        out = {}
        if s["linear_probe"]:
            out["linear_probe"] = linear_probe(*f, num_classes=f.num_classes)
        if s["logistic_probe"]:
            from clipjax.evals.logistic_probe import logistic_probe

            out["logistic_probe"] = logistic_probe(*f, num_classes=f.num_classes)
        if s["few_shot"]:
            from clipjax.evals.logistic_probe import few_shot_probes

            out["few_shot"] = few_shot_probes(*f, num_classes=f.num_classes)
        if s["knn"]:
            out["knn"] = knn_accuracy(*f, num_classes=f.num_classes)
        return out


def _any_probe(settings) -> bool:
    return any(settings[k] for k in ("linear_probe", "logistic_probe", "few_shot", "knn"))


def _split_rows(builder, split: str, rows: slice) -> str:
    """Records `rows` of `split` ("test", "train[:10%]+test", ...) as a tfds split string ('' for none)."""
    pieces, offset = [], 0
    for part in tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits):
        start = part.from_ or 0
        stop = builder.info.splits[part.splitname].num_examples if part.to is None else part.to
        low, high = max(rows.start - offset, 0), min(rows.stop - offset, stop - start)
        if low < high:
            pieces.append(f"{part.splitname}[{start + low}:{start + high}]")
        offset += stop - start
    return "+".join(pieces)


def benchmark_sections() -> dict[str, dict]:
    """The settings that make each `BENCHMARKS` entry a `config.evals` section: zero-shot on its
    evaluation split (probes off: most have no train split, and ImageNet's is large)."""
    return {
        section: {
            "dataset": b.dataset,
            "split": b.split,
            "linear_probe": False,
            "knn": False,
        }
        for section, b in BENCHMARKS.items()
    }
