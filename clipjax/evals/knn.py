"""Weighted k-nearest-neighbour classification on frozen features (the InstDisc / DINO protocol).

Train and test features are L2-normalised; for each test feature the k train features of highest
cosine similarity vote for their classes with weight exp(similarity / temperature), and the class
with the largest total wins (ties: the lower class index; neighbours of exactly equal similarity
at the k-th place are picked arbitrarily). Test features are processed in batches of
`batch_size`, so memory stays at batch_size x N float32 similarities at a time.

Keys of the result, for each k asked for: 'top1@k{k}' (e.g. 'top1@k20'), the test accuracy.
A k larger than the number of train features uses all of them (the key keeps the k asked for).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clipjax.evals.base import Evaluator, label_fields, register_evaluator
from clipjax.evals.embed import l2_normalize
from clipjax.schema import Field, positive_ints


def knn_predictions(
    train_features,
    train_labels,
    test_features,
    *,
    k: Sequence[int] = (1, 10, 20),
    temperature: float = 0.07,
    num_classes: int,
    batch_size: int = 1024,
) -> dict[int, np.ndarray]:
    """{k: predicted class int64 [M]} for every k; see the module docstring."""
    ks = sorted({int(v) for v in k})
    if not ks or ks[0] < 1:
        raise ValueError(f"k must be positive integers, got {list(k)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    train = l2_normalize(np.asarray(train_features, np.float32))
    test = l2_normalize(np.asarray(test_features, np.float32))
    labels = np.asarray(train_labels).astype(np.int64).reshape(-1)
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(f"features must be [N, d] and [M, d], got {train.shape} and {test.shape}")
    if len(labels) != len(train) or len(train) == 0:
        raise ValueError(
            f"need one label per train feature and at least one, got "
            f"{len(labels)} labels for {len(train)} features"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"train labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    n = len(train)
    kmax = min(ks[-1], n)
    out = {kk: np.empty(len(test), np.int64) for kk in ks}
    for start in range(0, len(test), batch_size):
        sim = test[start : start + batch_size] @ train.T  # [b, N]
        b = len(sim)
        if kmax < n:
            top = np.argpartition(-sim, kmax - 1, axis=1)[:, :kmax]
        else:
            top = np.broadcast_to(np.arange(n), (b, n))
        top_sim = np.take_along_axis(sim, top, axis=1)
        order = np.argsort(-top_sim, axis=1, kind="stable")  # most similar first
        neighbour_labels = labels[np.take_along_axis(top, order, axis=1)]
        weight = np.exp(np.take_along_axis(top_sim, order, axis=1).astype(np.float64) / temperature)
        # Add the neighbours' votes one rank at a time; read off the winner at each k.
        scores = np.zeros((b, num_classes))
        rows = np.arange(b)
        for j in range(kmax):
            scores[rows, neighbour_labels[:, j]] += weight[:, j]
            for kk in ks:
                if min(kk, kmax) == j + 1:
                    out[kk][start : start + b] = np.argmax(scores, axis=1)
    return out


def knn_accuracy(
    train_features,
    train_labels,
    test_features,
    test_labels,
    *,
    k: Sequence[int] = (1, 10, 20),
    temperature: float = 0.07,
    num_classes: int,
    batch_size: int = 1024,
) -> dict:
    """{'top1@k{k}': accuracy} for each k; see the module docstring."""
    test_labels = np.asarray(test_labels).astype(np.int64).reshape(-1)
    if len(test_labels) != len(test_features):
        raise ValueError(
            f"need one label per test feature, got {len(test_labels)} labels for "
            f"{len(test_features)} features"
        )
    predictions = knn_predictions(
        train_features,
        train_labels,
        test_features,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        batch_size=batch_size,
    )
    return {
        f"top1@k{kk}": float(np.mean(pred == test_labels)) if len(test_labels) else float("nan")
        for kk, pred in predictions.items()
    }


@register_evaluator
class KnnEvaluator(Evaluator):
    """Weighted kNN on frozen image features, fitted on the first train examples."""

    kind = "knn"
    FIELDS = {
        "train_examples": Field(5000, "train examples the neighbours come from", minimum=1),
        "k": Field((1, 10, 20), "neighbour counts reported", type=tuple, check=positive_ints),
        "temperature": Field(0.07, "vote weight exp(similarity / temperature)", minimum=1e-6),
        "fields": label_fields("classified (at the largest k)"),
    }

    def run(self, encoders):
        f = self.data.frozen_features(encoders, self.settings["train_examples"])
        k, temperature = self.settings["k"], self.settings["temperature"]
        report = knn_accuracy(*f, k=k, temperature=temperature, num_classes=f.num_classes)

        def top1(g):
            scores = knn_accuracy(*g, k=(max(k),), temperature=temperature, num_classes=g.num_classes)
            return scores[f"top1@k{max(k)}"]

        fields = self.per_field(encoders, top1)
        if fields:
            report["fields"] = fields
        return {"num_examples": int(len(f.test_labels)), "knn": report}
