"""Linear probe: closed-form ridge regression on frozen features to one-hot targets.

The protocol, step by step:

  * Features are standardised per dimension (z-score) with the mean and standard deviation of
    the examples being fitted; test (or validation) features use those same statistics. With
    unit-variance features the regulariser grid has one meaning whatever the encoder's scale.
  * Targets are one-hot class indicators, centred with their mean over the fitted examples, so
    the (unpenalised) intercept is the class prior and only the weights are shrunk.
  * W minimises  (1/n) ||X W - Y||^2 + lambda ||W||^2,  i.e.  W = (X^T X / n + lambda I)^-1 X^T Y / n.
    With n >= d the d x d covariance is eigendecomposed once and every lambda of the grid costs
    one diagonal rescaling; with n < d the n x n Gram matrix is used instead (the dual form,
    same W). Accumulation is in float64 over row chunks, so 50k x 1024 float32 features need
    ~8 MiB of covariance plus one float64 chunk, not a float64 copy of the features.
  * lambda is chosen on a held-out 20% of the TRAIN features (a seeded random subset, because
    datasets are often stored sorted by class, so "the last 20%" could miss classes): fit on the
    other 80%, keep the lambda with the best validation top-1 (ties: the larger lambda), then
    refit on all training features with that lambda and score the test features.
  * The prediction is the argmax over classes of the regression output (ties: the lower index).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clipjax.evals.base import Evaluator, label_fields, register_evaluator
from clipjax.schema import Field

_CHUNK = 8192
_EPS = 1e-6


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation per dimension, in float64, over row chunks."""
    n, d = x.shape
    mean = np.zeros(d)
    for start in range(0, n, _CHUNK):
        mean += np.asarray(x[start : start + _CHUNK], np.float64).sum(axis=0)
    mean /= n
    var = np.zeros(d)
    for start in range(0, n, _CHUNK):
        var += np.square(np.asarray(x[start : start + _CHUNK], np.float64) - mean).sum(axis=0)
    std = np.sqrt(var / n)
    # A constant dimension carries nothing: leave it at zero rather than dividing by ~0.
    std = np.where(std > _EPS * max(float(std.max(initial=0.0)), 1.0), std, np.inf)
    return mean, std


def _standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return (np.asarray(x, np.float64) - mean) / std


def _class_sums(x: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, d]: the sum of the rows of x of each class."""
    out = np.zeros((num_classes, x.shape[1]))
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    if len(classes):
        out[classes] = np.add.reduceat(x[order], starts, axis=0)
    return out


class _Ridge:
    """Ridge fits of (x, labels) for many regularisers at the cost of one eigendecomposition."""

    def __init__(self, x: np.ndarray, labels: np.ndarray, num_classes: int):
        n, d = x.shape
        self.n, self.d = n, d
        self.mean, self.std = _moments(x)
        counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
        self.prior = counts / n
        if n >= d:
            # Primal: C = X^T X / n = V diag(s) V^T,  W = V diag(1/(s+lambda)) V^T (X^T Y / n).
            cov = np.zeros((d, d))
            xty = np.zeros((d, num_classes))
            for start in range(0, n, _CHUNK):
                xs = _standardise(x[start : start + _CHUNK], self.mean, self.std)
                cov += xs.T @ xs
                # X is centred, so X^T (Y - mean Y) = X^T Y: per-class sums of rows.
                xty += _class_sums(xs, labels[start : start + _CHUNK], num_classes).T
            s, v = np.linalg.eigh(cov / n)
            self._left = v  # W = left @ diag(1/(s+lambda)) @ right
            self._right = v.T @ (xty / n)
        else:
            # Dual: K = X X^T / n = U diag(s) U^T,  W = X^T U diag(1/(s+lambda)) U^T (Y - mean Y) / n.
            xs = _standardise(x, self.mean, self.std)
            s, u = np.linalg.eigh(xs @ xs.T / n)
            y = np.eye(num_classes)[labels] - self.prior
            self._left = xs.T @ u / n
            self._right = u.T @ y
        self._s = np.maximum(s, 0.0)

    def weights(self, regularizer: float) -> np.ndarray:
        """[d, C] weights for standardised inputs."""
        return self._left @ (self._right / (self._s + regularizer)[:, None])

    def predict(self, x: np.ndarray, regularizers: Sequence[float]) -> np.ndarray:
        """[len(regularizers), n] predicted classes of the rows of x."""
        out = np.empty((len(regularizers), x.shape[0]), dtype=np.int64)
        weights = [self.weights(r) for r in regularizers]
        for start in range(0, x.shape[0], _CHUNK):
            xs = _standardise(x[start : start + _CHUNK], self.mean, self.std)
            for i, w in enumerate(weights):
                out[i, start : start + len(xs)] = np.argmax(xs @ w + self.prior, axis=1)
        return out


def _check(features, labels, num_classes: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(
            f"{what}: features must be [N, d] with one label each, got {features.shape} and {labels.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{what}: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )
    if not np.all(np.isfinite(features)):
        raise ValueError(f"{what}: features contain NaN or inf")
    return features, labels


def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation, rest) indices: a seeded random `fraction` of range(n) held out, each sorted
    (sequential reads, cheap for memory-mapped features)."""
    num_val = round(n * fraction)
    if n < 2 or not 1 <= num_val < n:
        raise ValueError(
            f"need at least 2 training examples and 0 < validation fraction < 1 "
            f"(got {n} examples, fraction {fraction})"
        )
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:num_val]), np.sort(order[num_val:])


def linear_probe(
    train_features,
    train_labels,
    test_features,
    test_labels,
    *,
    num_classes: int,
    regularizers: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1, 10),
    val_fraction: float = 0.2,
    seed: int = 0,
    return_predictions: bool = False,
) -> dict:
    """Ridge-regression linear probe; see the module docstring for the protocol.

    train_features [N, d], train_labels int [N] in [0, num_classes), likewise for test.
    Returns {'top1': test accuracy, 'regularizer': the chosen lambda (an element of
    `regularizers`), 'val_top1': its accuracy on the held-out part of the train features}, and
    with `return_predictions` the test predictions."""
    x, y = _check(train_features, train_labels, num_classes, "train")
    xt, yt = _check(test_features, test_labels, num_classes, "test")
    regularizers = [float(r) for r in regularizers]
    if not regularizers or min(regularizers) <= 0:
        raise ValueError(f"regularizers must be a non-empty list of positive values, got {regularizers}")
    if xt.shape[1] != x.shape[1]:
        raise ValueError(f"train features have dimension {x.shape[1]}, test features {xt.shape[1]}")
    val_idx, fit_idx = validation_split(len(x), val_fraction, seed)
    ridge = _Ridge(x[fit_idx], y[fit_idx], num_classes)
    val_pred = ridge.predict(x[val_idx], regularizers)
    val_acc = np.mean(val_pred == y[val_idx], axis=1)
    best = max(range(len(regularizers)), key=lambda i: (val_acc[i], regularizers[i]))

    final = _Ridge(x, y, num_classes)
    test_pred = final.predict(xt, [regularizers[best]])[0]
    out = {
        "top1": float(np.mean(test_pred == yt)) if len(yt) else float("nan"),
        "regularizer": regularizers[best],
        "val_top1": float(val_acc[best]),
    }
    if return_predictions:
        out["predictions"] = test_pred
    return out


@register_evaluator
class LinearProbeEvaluator(Evaluator):
    """Closed-form ridge linear probe on frozen image features, fitted on the first train examples."""

    kind = "linear_probe"
    FIELDS = {
        "train_examples": Field(5000, "train examples the probe is fitted on", minimum=1),
        "fields": label_fields("probed"),
    }

    def run(self, encoders):
        f = self.data.frozen_features(encoders, self.settings["train_examples"])
        report = linear_probe(*f, num_classes=f.num_classes)
        fields = self.per_field(encoders, lambda g: linear_probe(*g, num_classes=g.num_classes)["top1"])
        if fields:
            report["fields"] = fields
        return {"num_examples": int(len(f.test_labels)), "linear_probe": report}
