"""Evaluation on a prepared tensorflow-datasets image-classification dataset (cifar10, imagenet2012, ...)."""

from __future__ import annotations

from clipjax.data import classification as datasets
from clipjax.evals.base import Evaluator, FrozenFeatures, register_evaluator
from clipjax.evals.knn import knn_accuracy
from clipjax.evals.linear_probe import linear_probe
from clipjax.evals.zero_shot import class_embeddings, zero_shot_accuracy
from clipjax.schema import ConfigError, Field


@register_evaluator
class ClassificationEvaluator(Evaluator):
    """Zero-shot (its class names x prompts), linear probe and kNN on a tfds classification dataset."""

    kind = "classification"
    FIELDS = {
        "dataset": Field("", "tfds name, e.g. `cifar10` or `imagenet2012:5.1.0`, prepared in data_dir"),
        "data_dir": Field("", "where it is prepared (empty: data.data_dir)"),
        "zero_shot": Field(True, "zero-shot top-1/top-5"),
        "linear_probe": Field(True, "ridge probe on frozen features of its train split"),
        "knn": Field(True, "weighted kNN on frozen features of its train split"),
        "train_examples": Field(5000, "train examples for the probe and kNN", minimum=1),
        "max_examples": Field(0, "test examples (0: evals.max_examples)", minimum=0),
    }

    @classmethod
    def check(cls, settings, config, path):
        if not settings["dataset"]:
            raise ConfigError(f"{path}.dataset: name a prepared tfds image-classification dataset")
        try:
            datasets.get_builder(settings["dataset"], settings["data_dir"] or config.data.data_dir)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{path}.dataset: {str(e).splitlines()[0]}") from None

    def run(self, encoders):
        s = self.settings
        name, data_dir = s["dataset"], s["data_dir"] or self.config.data.data_dir
        size = self.config.data.image_size
        test = datasets.load_classification_split(
            name, data_dir, "test", size, max_examples=s["max_examples"] or self.config.evals.max_examples
        )
        test_emb = encoders.image(test["image"])
        result = {"num_examples": int(len(test_emb))}
        if s["zero_shot"]:
            names, templates = datasets.zero_shot_task(name, data_dir)
            classes = class_embeddings(encoders.text, names, templates)
            result["zero_shot"] = zero_shot_accuracy(test_emb, classes, test["label"])
        if s["linear_probe"] or s["knn"]:
            train = datasets.load_classification_split(
                name, data_dir, "train", size, max_examples=s["train_examples"]
            )
            f = FrozenFeatures(encoders.image(train["image"]), train["label"], test_emb, test["label"])
            if s["linear_probe"]:
                result["linear_probe"] = linear_probe(*f, num_classes=f.num_classes)
            if s["knn"]:
                result["knn"] = knn_accuracy(*f, num_classes=f.num_classes)
        return {"classification": {name: result}}
