"""Zero-shot classification: class names x prompt templates, averaged into one classifier per class."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from clipjax.evals.base import Evaluator, SkipEvaluation, register_evaluator
from clipjax.evals.embed import l2_normalize


def class_embeddings(
    encode_texts: Callable[[list[str]], np.ndarray], class_names: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
    """[C, d]: the mean of each class's normalised prompt embeddings, renormalised (CLIP's recipe)."""
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = l2_normalize(encode_texts(prompts)).reshape(len(class_names), len(templates), -1)
    return l2_normalize(emb.mean(axis=1))


def zero_shot_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> dict:
    """top-1, top-5 (when there are more than 5 classes) and per-class top-1 accuracy."""
    scores = image_emb @ class_emb.T
    order = np.argsort(-scores, axis=1)
    result = {"top1": float(np.mean(order[:, 0] == labels))}
    if class_emb.shape[0] > 5:
        result["top5"] = float(np.mean(np.any(order[:, :5] == labels[:, None], axis=1)))
    return result


def per_class_accuracy(
    image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
) -> dict[str, float]:
    predicted = np.argmax(image_emb @ class_emb.T, axis=1)
    return {
        name: float(np.mean(predicted[labels == c] == c))
        for c, name in enumerate(class_names)
        if np.any(labels == c)
    }


@register_evaluator
class ZeroShotEvaluator(Evaluator):
    """Zero-shot classification of each attribute the data source labels (class names x prompts)."""

    kind = "zero_shot"

    def run(self, encoders):
        tasks = self.data.source.zero_shot_tasks()
        if not tasks:
            raise SkipEvaluation(
                f"data.name={self.data.source.config.name!r} names no classes to classify "
                "(own data: a CSV `label` column of class names, class subfolders, or data.class_names "
                "for numeric labels: a CSV's, webdataset's .cls or data.label_field, tfds' data.tfds_label_key)"
            )
        arrays = self.data.heldout
        image_emb, _ = self.data.heldout_embeddings(encoders)
        result = {}
        for attribute, (class_names, templates) in tasks.items():
            labels = np.asarray(arrays[attribute])
            labelled = labels >= 0  # own data may label only some images
            if not labelled.any():
                raise SkipEvaluation(f"no held-out example has a {attribute!r} label")
            if labels.max() >= len(class_names):
                raise SkipEvaluation(
                    f"held-out label {int(labels.max())} has no class name ({len(class_names)} names given)"
                )
            classes = class_embeddings(encoders.text, class_names, templates)
            emb, labels = image_emb[labelled], labels[labelled]
            result[attribute] = zero_shot_accuracy(emb, classes, labels)
            result[attribute]["per_class"] = per_class_accuracy(emb, classes, labels, class_names)
        result["mean_top1"] = float(np.mean([v["top1"] for v in result.values()]))
        return {"num_examples": int(len(image_emb)), "zero_shot": result}
